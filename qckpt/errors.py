"""Every error qckpt raises, grouped by what a caller would do about it.

::

    QckptError
    ├── NotFoundError (also KeyError)            the named thing does not exist
    │   ├── RepositoryNotFoundError              path/URI holds no repository
    │   ├── RevisionNotFoundError                unknown branch, tag or snapshot id
    │   └── ObjectNotFoundError                  a backend key is missing
    ├── InvalidInputError (also ValueError)      the call itself is wrong; fix the input
    │   ├── InvalidRefNameError                  bad branch/tag name
    │   ├── AmbiguousRevisionError               id prefix matches several snapshots
    │   ├── UnsupportedValueError                a state leaf cannot be stored safely
    │   └── StateMismatchError                   snapshot does not fit the live state
    ├── ConflictError                            someone else got there first
    │   ├── AlreadyExistsError                   repository, tag, branch or key exists
    │   ├── RefConflictError                     a ref moved under a compare-and-swap
    │   ├── DivergedError                        a restored state would move its branch elsewhere: reset first
    │   └── LockLostError                        the writer lock lapsed while held; stopped before writing more
    ├── IntegrityError                           stored bytes are damaged
    ├── FormatVersionError                       repository written by a newer qckpt
    ├── CommitAbortedError                       not written: an earlier async commit failed
    ├── RepositoryClosedError                    the Repository object was closed: open it again
    ├── RolloutError                             a future trained elsewhere (a Ray task) failed
    └── BackendError                             the storage itself failed (permanent)
        └── TransientBackendError                a failure that retrying may cure (5xx, timeout)

Errors never carry credentials. Not-found errors print their message plainly
(``KeyError`` would otherwise quote it).
"""

from __future__ import annotations

__all__ = [
    "QckptError",
    "NotFoundError",
    "RepositoryNotFoundError",
    "RevisionNotFoundError",
    "ObjectNotFoundError",
    "InvalidInputError",
    "InvalidRefNameError",
    "AmbiguousRevisionError",
    "UnsupportedValueError",
    "StateMismatchError",
    "ConflictError",
    "AlreadyExistsError",
    "RefConflictError",
    "DivergedError",
    "LockLostError",
    "IntegrityError",
    "FormatVersionError",
    "CommitAbortedError",
    "RepositoryClosedError",
    "RolloutError",
    "BackendError",
    "TransientBackendError",
]


class QckptError(Exception):
    """Base class of every error raised by qckpt."""


class NotFoundError(QckptError, KeyError):
    """The named repository, revision or object does not exist."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class RepositoryNotFoundError(NotFoundError):
    """The path or URI does not hold a qckpt repository."""


class RevisionNotFoundError(NotFoundError):
    """No branch, tag or snapshot matches the revision."""


class ObjectNotFoundError(NotFoundError):
    """A backend has no value under the requested key."""


class InvalidInputError(QckptError, ValueError):
    """The arguments of the call are invalid; nothing was changed."""


class InvalidRefNameError(InvalidInputError):
    """A branch or tag name breaks the naming rules."""


class AmbiguousRevisionError(InvalidInputError):
    """A snapshot id prefix matches more than one snapshot."""


class UnsupportedValueError(InvalidInputError):
    """A leaf of the training state cannot be represented without pickle."""


class StateMismatchError(InvalidInputError):
    """The snapshot does not fit the live training state.

    ``problems`` lists one line per offending state key; the live state was not modified.
    """

    def __init__(self, message: str, problems: list[str]) -> None:
        super().__init__(message + "".join(f"\n  - {p}" for p in problems))
        self.problems = problems


class ConflictError(QckptError):
    """Another writer or an existing name got there first."""


class AlreadyExistsError(ConflictError):
    """The repository, ref or key to be created exists already."""


class RefConflictError(ConflictError):
    """A compare-and-swap on a ref failed because the ref moved.

    ``expected`` is what the caller last saw, ``actual`` what the ref holds now
    (``None`` for an absent ref).
    """

    def __init__(self, ref: str, expected: str | None, actual: str | None) -> None:
        super().__init__(
            f"ref {ref!r} moved concurrently: expected {expected or '<absent>'}, "
            f"found {actual or '<absent>'}"
        )
        self.ref = ref
        self.expected = expected
        self.actual = actual


class DivergedError(ConflictError):
    """A commit of a state restored from one snapshot would move a branch that is now
    elsewhere: ``Repository.reset`` the branch to that snapshot first (an explicit,
    logged move), or commit to another branch."""


class LockLostError(ConflictError):
    """The writer lock lapsed while held (its heartbeat stalled past the lease), so
    the operation stopped before its next irreversible step."""


class IntegrityError(QckptError):
    """Stored data failed verification (digest, header or decoding)."""


class FormatVersionError(QckptError):
    """The repository uses a format version this qckpt cannot read."""


class CommitAbortedError(QckptError):
    """An asynchronous commit queued behind one that failed was not written, so
    that no branch moves past a failed commit. The cause is the failure."""


class RepositoryClosedError(QckptError):
    """The ``Repository`` object was closed (``close``, or the end of its ``with``
    block); every later call raises this. Open the repository again."""


class RolloutError(QckptError):
    """A rollout that ran elsewhere (a Ray task training one future) failed, after
    its retries; the cause is chained. Nothing was chosen from that event."""


class BackendError(QckptError):
    """The storage backend failed to perform an operation."""


class TransientBackendError(BackendError):
    """A storage failure that may succeed when retried (throttling, 5xx, dropped connection)."""
