"""Manifests and snapshots: the immutable metadata records of a repository.

Both are JSON; a manifest is zstd-compressed (it lists every chunk id), a
snapshot is plain JSON. Each is stored under the xxh3-128 of its stored bytes
(``manifests/<id>``, ``snapshots/<id>``) and verified against it on every read.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

import zstandard

from qckpt.errors import IntegrityError
from qckpt.format.ids import ID_HEX, hex_id
from qckpt.format.tensors import itemsize
from qckpt.format.tree import Json, decode_plain, decode_tree, encode_plain, replace_leaves

RECORD_VERSION = 1


def _record_check(body: dict[str, Any]) -> str:
    """The digest a ref log record carries of its own fields (its key is not its hash)."""
    return hex_id(json.dumps(body, sort_keys=True).encode())


def _verified_json(kind: str, record_id: str, data: bytes, decompress: bool) -> dict[str, Any]:
    if hex_id(data) != record_id:
        raise IntegrityError(f"{kind} {record_id} is damaged: content does not match its id")
    try:
        if decompress:
            data = zstandard.ZstdDecompressor().decompress(data)
        doc = json.loads(data)
    except (zstandard.ZstdError, ValueError) as e:
        raise IntegrityError(f"{kind} {record_id} cannot be parsed: {e}") from e
    if not isinstance(doc, dict) or doc.get("version") != RECORD_VERSION:
        raise IntegrityError(f"{kind} {record_id} has an unsupported layout or version")
    return doc


LOSSY_ANNOTATION = "lossy"  # the annotation key a lossy-tier snapshot carries
WARM_PARTS_ANNOTATION = "warm_parts"  # the part manifests whose warm copies hold a snapshot written by several processes


@dataclass(frozen=True)
class TensorEntry:
    """One tensor or array of a snapshot: path, kind (``tensor``/``ndarray``), dtype,
    shape, and the ids of the chunks that hold its bytes in order."""

    path: str
    kind: str
    dtype: str
    shape: tuple[int, ...]
    chunk_size: int
    chunks: tuple[bytes, ...]

    @property
    def itemsize(self) -> int:
        return itemsize(self.kind, self.dtype)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize

    def spans(self) -> list[tuple[bytes, int, int]]:
        """(chunk id, byte offset, byte length) of each chunk within the tensor."""
        total = self.nbytes
        return [(c, i * self.chunk_size, min(self.chunk_size, total - i * self.chunk_size)) for i, c in enumerate(self.chunks)]


@dataclass(frozen=True)
class Manifest:
    """The tree of one snapshot: the encoded plain structure and its tensor table."""

    tree: Json
    tensors: tuple[TensorEntry, ...]

    @cached_property
    def structure(self) -> Any:
        """The committed tree with each tensor as its ``TensorEntry``: decoded the first
        time it is asked for, then shared by every caller, who must not modify it."""
        return decode_tree(self.tree, self.tensors.__getitem__)

    def tree_of(self, values: Sequence[Any]) -> Any:
        """The committed tree with tensor-table entry i as ``values[i]`` (what
        ``decode_tree(self.tree, values.__getitem__)`` gives), built from ``structure``."""
        position = self._positions
        return replace_leaves(self.structure, TensorEntry, lambda entry: values[position[id(entry)]])

    @cached_property
    def _positions(self) -> dict[int, int]:
        """Each entry of ``tensors`` (by identity: ``structure`` holds these objects) to its index."""
        return {id(entry): i for i, entry in enumerate(self.tensors)}

    def to_bytes(self) -> bytes:
        doc = {
            "version": RECORD_VERSION,
            "tree": self.tree,
            "tensors": [
                {"path": t.path, "kind": t.kind, "dtype": t.dtype, "shape": list(t.shape),
                 "chunk_size": t.chunk_size, "chunks": [c.hex() for c in t.chunks]}
                for t in self.tensors
            ],
        }  # fmt: skip
        return zstandard.ZstdCompressor(level=3).compress(json.dumps(doc, separators=(",", ":")).encode())

    @classmethod
    def from_bytes(cls, manifest_id: str, data: bytes) -> Manifest:
        doc = _verified_json("manifest", manifest_id, data, decompress=True)
        try:
            tensors = tuple(
                TensorEntry(t["path"], t["kind"], t["dtype"], tuple(int(n) for n in t["shape"]),
                            int(t["chunk_size"]), tuple(bytes.fromhex(c) for c in t["chunks"]))
                for t in doc["tensors"]
            )  # fmt: skip
            for t in tensors:
                expected = -(-t.nbytes // t.chunk_size) if t.chunk_size > 0 else -1
                if t.kind not in ("tensor", "ndarray") or len(t.chunks) != expected:
                    raise ValueError(f"tensor {t.path!r} is inconsistent")
            return cls(doc["tree"], tensors)
        except (KeyError, TypeError, ValueError) as e:
            raise IntegrityError(f"manifest {manifest_id} is malformed: {e}") from e


@dataclass(frozen=True)
class RefLogEntry:
    """One change of a branch or tag: ``ref`` (``heads/main``) moved from ``old`` to
    ``new`` (None: absent) at ``time`` because of ``cause`` (``commit``, ``join``,
    ``average``, ``create``, ``reset``, ``delete``, ``gc``...). ``rewinds``: the
    change left ``old`` out of the ref's history (a reset elsewhere, a deletion),
    so garbage collection protects ``old`` for a grace period."""

    ref: str
    old: str | None
    new: str | None
    time: float
    cause: str
    rewinds: bool

    def to_bytes(self) -> bytes:
        body = {"version": RECORD_VERSION, **asdict(self)}
        return json.dumps({**body, "check": _record_check(body)}, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, key: str, data: bytes) -> RefLogEntry:
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("version") != RECORD_VERSION:
                raise ValueError("unsupported layout or version")
            check = doc.pop("check", None)  # records written before checks were added have none
            if check is not None and check != _record_check(doc):
                raise ValueError("its content does not match its check digest")
            entry = cls(str(doc["ref"]), doc["old"], doc["new"], float(doc["time"]), str(doc["cause"]), bool(doc["rewinds"]))
            if any(v is not None and not (isinstance(v, str) and ID_HEX.fullmatch(v)) for v in (entry.old, entry.new)):
                raise ValueError("bad snapshot id")
            return entry
        except (KeyError, TypeError, ValueError) as e:
            raise IntegrityError(f"ref log entry {key} is malformed: {e}") from e


@dataclass(frozen=True)
class CommitStats:
    """Sizes measured while committing one snapshot."""

    raw_bytes: int = 0  # bytes of all tensors in the snapshot
    chunks: int = 0  # chunks referenced
    new_chunks: int = 0  # chunks not stored before this commit
    new_raw_bytes: int = 0  # raw bytes of those new chunks
    new_stored_bytes: int = 0  # bytes written to packs for them
    notes: tuple[str, ...] = ()  # what the commit could not do as well as usual (e.g. an optimizer it could not predict)


@dataclass(frozen=True)
class Snapshot:
    """One commit: a manifest, its parents, and what was recorded with it.

    ``annotations`` is plain data written by operations (a join records its
    candidates there, a lossy-tier commit its precision under ``"lossy"``).
    Create with ``Snapshot.new``; the id is the digest of ``to_bytes()``.
    """

    id: str
    manifest: str
    parents: tuple[str, ...]
    step: int | None
    time: float
    message: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    stats: CommitStats = field(default_factory=CommitStats)
    annotations: dict[str, Any] = field(default_factory=dict)
    _bytes: bytes = field(default=b"", repr=False, compare=False)  # the stored record, once serialised

    @property
    def short_id(self) -> str:
        return self.id[:12]

    @property
    def lossy(self) -> dict[str, Any] | None:
        """The lossy tier's record (``mantissa_bits``, ``relative_error``) if this
        snapshot's floats were stored rounded, else None (bit-exact)."""
        return self.annotations.get(LOSSY_ANNOTATION)

    @property
    def warm_parts(self) -> tuple[str, ...]:
        """Ids of the part manifests whose warm copies (``warm/<id>``) hold this
        snapshot's tensors, when several processes wrote them (``torch.distributed
        .checkpoint`` ranks); empty otherwise. Malformed entries are ignored: a
        warm copy is a cache."""
        parts = self.annotations.get(WARM_PARTS_ANNOTATION)
        return tuple(p for p in parts if isinstance(p, str) and ID_HEX.fullmatch(p)) if isinstance(parts, list) else ()

    def _document(self) -> dict[str, Any]:
        stats = {k: list(v) if k == "notes" else v for k, v in asdict(self.stats).items() if k != "notes" or v}
        return {
            "version": RECORD_VERSION, "manifest": self.manifest, "parents": list(self.parents),
            "step": self.step, "time": self.time, "message": self.message,
            "metrics": encode_plain(self.metrics), "stats": stats,
            "annotations": encode_plain(self.annotations),
        }  # fmt: skip

    def to_bytes(self) -> bytes:
        """The stored record (serialised once per snapshot)."""
        return self._bytes or json.dumps(self._document(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def new(cls, **fields: Any) -> Snapshot:
        """A new snapshot with its content id (all fields but ``id``; ``time`` defaults to now)."""
        fields.setdefault("time", time.time())
        data = cls(id="", **fields).to_bytes()
        return cls(id=hex_id(data), **fields, _bytes=data)

    @classmethod
    def from_bytes(cls, snapshot_id: str, data: bytes) -> Snapshot:
        doc = _verified_json("snapshot", snapshot_id, data, decompress=False)
        try:
            parents = tuple(doc["parents"])
            if not ID_HEX.fullmatch(doc["manifest"]) or not all(ID_HEX.fullmatch(p) for p in parents):
                raise ValueError("bad id")
            stats = dict(doc["stats"])
            stats["notes"] = tuple(str(n) for n in stats.get("notes", ()))
            return cls(
                id=snapshot_id, manifest=doc["manifest"], parents=parents, step=doc["step"],
                time=float(doc["time"]), message=str(doc["message"]), metrics=decode_plain(doc["metrics"]),
                stats=CommitStats(**stats), annotations=decode_plain(doc["annotations"]), _bytes=data,
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as e:
            raise IntegrityError(f"snapshot {snapshot_id} is malformed: {e}") from e
