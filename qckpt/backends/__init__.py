"""Storage backends: a write-once blob store plus compare-and-swap refs.

Backends know nothing about snapshots, manifests or codecs; the repository
layer above decides what the keys and bytes mean.
"""

from qckpt.backends._base import Backend, check_key
from qckpt.backends.local import LocalBackend
from qckpt.backends.memory import MemoryBackend

__all__ = ["Backend", "LocalBackend", "MemoryBackend", "check_key"]
