"""The store layer: the key layout, ref names, the chunk index, the reader, and
``Store`` with its one write transaction (``store.py``).

Built on ``qckpt.format`` and ``qckpt.backends`` only. Internal to qckpt.
"""
