"""Storage backends: a write-once blob store plus compare-and-swap refs.

Backends know nothing about snapshots, manifests or codecs; the repository
layer above decides what the keys and bytes mean.
"""

from qckpt.backends._base import Backend, Capabilities, MappedBlob, check_blob_key, check_key, joined
from qckpt.backends._reflock import LOCK_PREFIX, Lease
from qckpt.backends.local import LocalBackend
from qckpt.backends.memory import MemoryBackend
from qckpt.backends.retry import RetryingBackend
from qckpt.backends.s3 import S3Backend, parse_s3_uri

__all__ = [
    "LOCK_PREFIX", "Backend", "Capabilities", "Lease", "LocalBackend", "MappedBlob", "MemoryBackend", "RetryingBackend", "S3Backend",
    "check_blob_key", "check_key", "joined", "parse_s3_uri",
]  # fmt: skip
