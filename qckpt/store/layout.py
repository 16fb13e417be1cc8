"""Where everything lives in a repository: every key and ref name, in one place.

Blobs (immutable, content-addressed):

* ``config``                 repository settings (JSON), written once by ``init``
                             and rewritten only to raise the format version
* ``packs/<id>.pack``        objects, with a footer indexing them
* ``manifests/<id>``         snapshot trees (zstd JSON)
* ``snapshots/<id>``         snapshot records (JSON)
* ``warm/<snapshot id>``     the warm copy of a branch head: every tensor's raw bytes
                             (``qckpt.format.warm``); a cache, replaced as the head moves
* ``reflog/<ref>/<time>-<n>[-rewind]`` one record per change of a branch or tag
                             (JSON; ``<time>``: 20-digit nanoseconds, so keys sort by
                             time; ``-rewind`` marks changes that left a snapshot behind,
                             so GC finds them by listing, without reading every record)

Refs (mutable, compare-and-swap; stored by the backend under its reserved
``refs/`` namespace, which no blob key may use):

* ``heads/<branch>``, ``tags/<tag>``   snapshot ids
* ``gc/generation``                    changed by every garbage collection
* ``locks/<uuid>``                     the writer lock, on backends without a
                                       native one (see ``qckpt.backends``)
"""

from __future__ import annotations

from qckpt.backends import LOCK_PREFIX

CONFIG_KEY = "config"
PACK_PREFIX = "packs/"
MANIFEST_PREFIX = "manifests/"
SNAPSHOT_PREFIX = "snapshots/"
REFLOG_PREFIX = "reflog/"
WARM_PREFIX = "warm/"
RECORD_PREFIXES = (PACK_PREFIX, MANIFEST_PREFIX, SNAPSHOT_PREFIX)  # everything stored, for accounting

BRANCH_PREFIX = "heads/"
TAG_PREFIX = "tags/"
GC_GENERATION_REF = "gc/generation"
__all__ = [
    "BRANCH_PREFIX", "CONFIG_KEY", "GC_GENERATION_REF", "LOCK_PREFIX", "MANIFEST_PREFIX", "PACK_PREFIX",
    "RECORD_PREFIXES", "REFLOG_PREFIX", "REWIND_SUFFIX", "SNAPSHOT_PREFIX", "TAG_PREFIX", "WARM_PREFIX", "manifest_key",
    "pack_id_of", "pack_key", "reflog_key", "reflog_key_time", "snapshot_key", "warm_key",
]  # fmt: skip


def pack_key(pack_id: str) -> str:
    return f"{PACK_PREFIX}{pack_id}.pack"


def pack_id_of(key: str) -> str:
    """The pack id in a key ``pack_key`` made."""
    return key.removeprefix(PACK_PREFIX).removesuffix(".pack")


def manifest_key(manifest_id: str) -> str:
    return f"{MANIFEST_PREFIX}{manifest_id}"


def snapshot_key(snapshot_id: str) -> str:
    return f"{SNAPSHOT_PREFIX}{snapshot_id}"


def warm_key(snapshot_id: str) -> str:
    return f"{WARM_PREFIX}{snapshot_id}"


REWIND_SUFFIX = "-rewind"


def reflog_key(ref: str, time_ns: int, unique: str, rewinds: bool) -> str:
    """The key of one ref log record of ``ref`` (``heads/main``), sortable by time."""
    return f"{REFLOG_PREFIX}{ref}/{time_ns:020d}-{unique}{REWIND_SUFFIX if rewinds else ''}"


def reflog_key_time(key: str) -> float:
    """The time (seconds) in a key ``reflog_key`` made."""
    return int(key.rsplit("/", 1)[1][:20]) / 1e9
