"""qckpt: a storage-efficient checkpoint store for PyTorch training state.

Quick use::

    import qckpt
    repo = qckpt.Repository.init("ckpts")            # or Repository.open("ckpts")
    state = qckpt.TrainingState(model=model, optimizer=opt, scheduler=sched)
    for step in ...:
        ...train...
        state.step = step
        repo.commit(state, metrics={"loss": loss})   # every step, deduplicated
    repo.restore(state, "main@120")                   # back to step 120, bit-exact

This module is the public API (and ``qckpt.backends`` for storage backends,
``qckpt.testing`` for backend authors). The layers below it -- ``format``,
``store``, ``commit``, ``ops`` (see docs/design.md) -- are private and may change.
"""

from qckpt.backends import Backend, LocalBackend, MemoryBackend, RetryingBackend, S3Backend
from qckpt.commit.lossy import LossyTier
from qckpt.commit.writer import CommitHandle
from qckpt.data import ResumableSampler
from qckpt.errors import (
    AlreadyExistsError,
    AmbiguousRevisionError,
    BackendError,
    CommitAbortedError,
    ConflictError,
    DivergedError,
    FormatVersionError,
    IntegrityError,
    InvalidInputError,
    LockLostError,
    RolloutError,
    InvalidRefNameError,
    NotFoundError,
    ObjectNotFoundError,
    QckptError,
    RefConflictError,
    RepositoryClosedError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    StateMismatchError,
    TransientBackendError,
    UnsupportedValueError,
)
from qckpt.format.records import CommitStats, RefLogEntry, Snapshot, TensorEntry
from qckpt.ops.diff import TensorDiff
from qckpt.ops.fsck import FsckProblem, FsckReport
from qckpt.ops.gc import GcReport, RetentionPolicy
from qckpt.ops.usage import BranchUsage
from qckpt.ops.view import SnapshotView
from qckpt.repository import Repository, RepositoryStats
from qckpt.state import Lineage, Stateful, TrainingState
from qckpt.store.store import RepositoryConfig

__version__ = "0.1.0"

__all__ = [
    "AlreadyExistsError",
    "AmbiguousRevisionError",
    "Backend",
    "BranchUsage",
    "BackendError",
    "CommitAbortedError",
    "CommitHandle",
    "CommitStats",
    "ConflictError",
    "DivergedError",
    "FormatVersionError",
    "FsckProblem",
    "FsckReport",
    "GcReport",
    "IntegrityError",
    "LockLostError",
    "RolloutError",
    "RepositoryClosedError",
    "InvalidInputError",
    "InvalidRefNameError",
    "Lineage",
    "LossyTier",
    "LocalBackend",
    "MemoryBackend",
    "NotFoundError",
    "ObjectNotFoundError",
    "QckptError",
    "RefConflictError",
    "Repository",
    "RepositoryConfig",
    "RepositoryNotFoundError",
    "RepositoryStats",
    "ResumableSampler",
    "RefLogEntry",
    "RetentionPolicy",
    "RetryingBackend",
    "S3Backend",
    "RevisionNotFoundError",
    "Snapshot",
    "SnapshotView",
    "StateMismatchError",
    "Stateful",
    "TensorDiff",
    "TensorEntry",
    "TrainingState",
    "TransientBackendError",
    "UnsupportedValueError",
    "__version__",
]
