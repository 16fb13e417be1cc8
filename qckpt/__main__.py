"""``python -m qckpt``: the command line (same as the ``qckpt`` script)."""

from qckpt.cli import entry_point

entry_point()
