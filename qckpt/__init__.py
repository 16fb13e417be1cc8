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

This module is the public API; everything in modules starting with ``_`` is
private and may change.
"""

from qckpt._diff import TensorDiff
from qckpt._fsck import FsckProblem, FsckReport
from qckpt._gc import GcReport, RetentionPolicy
from qckpt._lossy import LossyTier
from qckpt._records import CommitStats, Snapshot, TensorEntry
from qckpt._view import SnapshotView
from qckpt.backends import Backend, LocalBackend, MemoryBackend, RetryingBackend, S3Backend
from qckpt.errors import (
    AlreadyExistsError,
    AmbiguousRevisionError,
    BackendError,
    CommitAbortedError,
    ConflictError,
    FormatVersionError,
    IntegrityError,
    InvalidInputError,
    InvalidRefNameError,
    NotFoundError,
    ObjectNotFoundError,
    QckptError,
    RefConflictError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    StateMismatchError,
    TransientBackendError,
    UnsupportedValueError,
)
from qckpt._writer import CommitHandle
from qckpt.repository import Repository, RepositoryConfig, RepositoryStats
from qckpt.state import Stateful, TrainingState

__version__ = "0.1.0"

__all__ = [
    "AlreadyExistsError",
    "AmbiguousRevisionError",
    "Backend",
    "BackendError",
    "CommitAbortedError",
    "CommitHandle",
    "CommitStats",
    "ConflictError",
    "FormatVersionError",
    "FsckProblem",
    "FsckReport",
    "GcReport",
    "IntegrityError",
    "InvalidInputError",
    "InvalidRefNameError",
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
