"""The background commit writer: one thread per repository, a bounded queue.

``submit`` enqueues a job (a staged commit, or any step that must run in order
with commits, such as a change of the hot tier) and returns a ``CommitHandle`` at once,
blocking only while ``max_pending`` commits are already queued or in flight
(back-pressure, bounded memory). Commits are written in submission order, so
each one's base is the previous one. A failure is never lost: it is raised
from its handle, and from the next ``submit`` (or ``flush``) unless the
handle already raised it to someone; commits
queued behind it are not written (``CommitAbortedError``), so no branch
moves past a failed commit. ``flush`` waits until everything submitted is
written; ``close`` flushes and stops the thread. Every open writer is flushed
at interpreter exit.
"""

from __future__ import annotations

import atexit
import concurrent.futures.thread  # noqa: F401  (its exit hook must be registered before ours)
import logging
import os
import queue
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future

from qckpt.errors import CommitAbortedError
from qckpt.format.records import Snapshot

_log = logging.getLogger("qckpt")
_open_writers: weakref.WeakSet[CommitWriter] = weakref.WeakSet()


class CommitHandle:
    """A commit in flight. ``wait()`` returns its ``Snapshot`` or raises its failure;
    ``done()`` tells without blocking; ``snapshot_id`` is None until written. Thread-safe."""

    def __init__(self, acknowledge: Callable[[BaseException], None]) -> None:
        self._future: Future[Snapshot] = Future()
        self._acknowledge = acknowledge

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: float | None = None) -> Snapshot:
        """Block until the commit is durable (or ``timeout`` seconds: ``TimeoutError``);
        raise its failure (which then counts as reported: the next commit will not raise it again)."""
        try:
            return self._future.result(timeout)
        except BaseException as e:
            if self._future.done():
                self._acknowledge(e)
            raise

    @property
    def snapshot_id(self) -> str | None:
        if not self._future.done() or self._future.exception() is not None:
            return None
        return self._future.result().id

    def __repr__(self) -> str:
        state = "pending" if not self.done() else ("failed" if self._future.exception() else self.snapshot_id)
        return f"CommitHandle({state})"


Job = Callable[[], Snapshot | None]  # None: a step that is not a commit (the handle then gives None)


class CommitWriter:
    """Runs each submitted job on one background thread, in submission order."""

    def __init__(self, max_pending: int, name: str) -> None:
        self._queue: queue.Queue[tuple[Job, CommitHandle] | None] = queue.Queue(maxsize=max_pending)
        self._lock = threading.Lock()
        self._failure: BaseException | None = None  # not yet reported to a caller
        self._aborting: BaseException | None = None  # fail what was queued behind it
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        _open_writers.add(self)

    def _acknowledge(self, error: BaseException) -> None:
        with self._lock:
            if self._failure is error:
                self._failure = None

    def _raise_failure(self) -> None:
        with self._lock:
            failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    def report_later(self, error: BaseException) -> None:
        """From a job, for a failure after its commit became durable (so its handle
        succeeds): raised by the next ``submit``, ``flush`` or ``close``; queued
        commits are still written."""
        with self._lock:
            self._failure = error

    @property
    def closed(self) -> bool:
        return not self._thread.is_alive()

    def submit(self, job: Job) -> CommitHandle:
        """Queue ``job``; first raises a background failure not reported yet."""
        self._raise_failure()
        handle = CommitHandle(self._acknowledge)
        self._queue.put((job, handle))  # blocks while max_pending commits are in flight
        return handle

    def flush(self) -> None:
        """Wait until every submitted commit is written; raise a failure not reported yet."""
        self._queue.join()
        self._raise_failure()

    def close(self) -> None:
        """Flush, then stop the thread. Raises a failure not reported yet (after stopping)."""
        if not self._thread.is_alive():
            return
        self._queue.join()
        self._queue.put(None)
        self._thread.join()
        _open_writers.discard(self)
        self._raise_failure()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                job, handle = item
                if self._aborting is not None:
                    error = CommitAbortedError("not written: an earlier asynchronous commit failed")
                    error.__cause__ = self._aborting
                    handle._future.set_exception(error)
                    continue
                try:
                    handle._future.set_result(job())
                except BaseException as e:  # reported through the handle and the next submit, never dropped
                    with self._lock:
                        self._failure = e
                    self._aborting = e
                    handle._future.set_exception(e)
            finally:
                if self._queue.empty():
                    self._aborting = None  # the queue drained: later commits start afresh
                self._queue.task_done()


def _flush_at_exit() -> None:
    for writer in list(_open_writers):
        try:
            writer.flush()
        except Exception as e:  # already set on its handle; at exit, logging is all that is left
            _log.error("an asynchronous commit failed and was never waited for: %s", e)


# Interpreter exit shuts thread pools down in threading's own exit hooks, which run
# before ``atexit`` ones; commits need the pool, so flush from such a hook, registered
# after concurrent.futures' (hooks run last-registered first). Private API, hence the fallback.
getattr(threading, "_register_atexit", atexit.register)(_flush_at_exit)
# A child made by fork (a DataLoader worker, say) has no writer threads: the writers,
# and their queued commits, are the parent's, so the child's exit must not wait for them.
os.register_at_fork(after_in_child=_open_writers.clear)
