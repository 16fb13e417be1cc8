"""The writer lock built from refs, for backends without a native one (S3).

A holder announces itself with ref ``locks/<uuid>`` holding JSON ``{"exclusive",
"created", "time", "host", "pid"}``, renews ``time`` every ``refresh_s`` (a
heartbeat thread) and deletes it on release. A lock not renewed for ``stale_s``
belongs to a crashed holder: it is ignored, and whoever sees it deletes it (a
compare-and-swap on the value seen, so a lock renewed meanwhile survives).
Protocol, safe given strongly consistent listing (as S3 has); ``lease_s`` is
``max(stale_s - 2 refresh_s, stale_s / 2)``:

* shared: list; while a live exclusive lock exists, wait and list again. Then
  hold the lock *unannounced*, for at most ``lease_s`` from when that listing
  was sent. A holder still holding at ``lease_s / 2`` announces itself (creates
  its lock ref, never backing off) and from then on renews it like any lock;
* exclusive: create, then wait until no live shared lock and no older live
  exclusive lock remains, and at least ``stale_s`` has passed since creating.

If a shared and an exclusive holder both proceeded: had the shared holder's
listing come after the exclusive lock existed, it would have waited; so it came
before, and the exclusive holder's deciding listing came at least ``stale_s``
later, when the shared holder had either finished (its lease is shorter) or
announced itself, and then the exclusive holder would have waited: a
contradiction. A commit therefore costs one listing, not a lock ref created and
deleted; garbage collection waits ``stale_s`` more. Writers are preferred, so
GC cannot starve behind a stream of commits. Holders' clocks must agree to well
within ``stale_s``.

A holder whose heartbeat stalls (a suspended process, a partitioned network)
loses the lock in others' eyes; ``Lease.check`` tells it so before each
irreversible step, with a margin of two heartbeats.
"""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from qckpt.errors import BackendError, LockLostError, ObjectNotFoundError, RefConflictError

if TYPE_CHECKING:
    from qckpt.backends._base import Backend

LOCK_PREFIX = "locks/"


class Lease:
    """A held writer lock. ``check()`` before an irreversible step: it raises
    ``LockLostError`` when the lock was not renewed recently enough that others
    still honour it. A lease with ``valid_for=None`` (a native lock) never lapses."""

    def __init__(self, valid_for: float | None = None) -> None:
        self._valid_for = valid_for
        self._renewed = time.monotonic()

    def renewed(self, at: float) -> None:
        """The lock was renewed by a request sent at monotonic time ``at``."""
        self._renewed = at

    @property
    def renewed_at(self) -> float:
        return self._renewed

    def check(self) -> None:
        if self._valid_for is None:
            return
        age = time.monotonic() - self._renewed
        if age > self._valid_for:
            raise LockLostError(
                f"the writer lock was last renewed {age:.1f} s ago, past its {self._valid_for:.0f} s lease: "
                "another process may treat it as abandoned, so nothing more is written under it"
            )


@contextmanager
def ref_lock(backend: Backend, *, exclusive: bool, refresh_s: float, stale_s: float, max_poll_s: float = 1.0) -> Iterator[Lease]:
    lock = _RefLock(backend, exclusive, refresh_s, stale_s, max_poll_s)
    lease = lock.acquire()
    stop = threading.Event()
    failure: list[BaseException] = []

    def heartbeat() -> None:
        try:
            if lock.current is None and not stop.wait(lock.lease_s / 2):  # still holding: announce ourselves
                lock.renew(lease)
            while not stop.wait(refresh_s):
                lock.renew(lease)
        except (BackendError, RefConflictError) as e:  # surfaced to the holder at release
            failure.append(e)

    beating = threading.Thread(target=heartbeat, name="qckpt-lock-refresh", daemon=True)
    beating.start()
    try:
        yield lease
    finally:
        stop.set()
        beating.join()
        lock.release()
    if failure:
        raise BackendError(f"{backend.uri}: the writer lock could not be kept fresh: {failure[0]}") from failure[0]


class _RefLock:
    """One holder's side of the protocol in the module docstring. Not thread-safe:
    ``acquire`` and ``release`` on the holder's thread, ``renew`` (which also
    announces an unannounced holder) on its heartbeat thread, never concurrently."""

    def __init__(self, backend: Backend, exclusive: bool, refresh_s: float, stale_s: float, max_poll_s: float) -> None:
        self.backend, self.exclusive = backend, exclusive
        self.refresh_s, self.stale_s, self.max_poll_s = refresh_s, stale_s, max_poll_s
        self.lease_s = max(stale_s - 2 * refresh_s, stale_s / 2)
        self.name = f"{LOCK_PREFIX}{uuid.uuid4().hex}"
        self.created = time.time()
        self.current: str | None = None  # our lock ref's value while it exists
        self._delay = 0.02

    def acquire(self) -> Lease:
        lease = Lease(self.lease_s)
        if not self.exclusive:
            while True:
                sent = time.monotonic()
                if not any(o.get("exclusive") for o in self._others().values()):
                    lease.renewed(sent)  # unannounced: honoured for lease_s from that listing
                    return lease
                self._wait()
        self.renew(lease)
        created = time.monotonic()
        while True:
            live = self._others()
            blockers = [r for r, o in live.items() if not o.get("exclusive") or (o.get("created", 0), r) < (self.created, self.name)]
            unannounced_for = created + self.stale_s - time.monotonic()  # shared holders that listed before we existed
            if not blockers and unannounced_for <= 0:
                return lease
            if blockers:
                self._wait()
            else:
                time.sleep(min(unannounced_for, self.refresh_s))
            if time.monotonic() - lease.renewed_at >= self.refresh_s:
                self.renew(lease)  # keep our own lock fresh while waiting, or others would clear it away

    def renew(self, lease: Lease) -> None:
        """Create or refresh our lock ref. The lease is extended only if the write
        landed while the lease still held (for an unannounced shared holder: before
        any exclusive holder that listed too early could decide); a lapsed lease
        stays lapsed."""
        sent = time.monotonic()
        self._write(self._body())
        if time.monotonic() - lease.renewed_at <= self.lease_s:
            lease.renewed(sent)

    def release(self) -> None:
        if self.current is not None:
            try:
                self.backend.swap_ref(self.name, self.current, None)
            except RefConflictError:  # cleared away as stale while we stalled; the lease checks said so
                pass
            self.current = None

    def _write(self, value: str) -> None:
        self.backend.swap_ref(self.name, self.current, value)
        self.current = value

    def _body(self) -> str:
        return json.dumps({"exclusive": self.exclusive, "created": self.created, "time": time.time(),
                           "host": socket.gethostname(), "pid": os.getpid()})  # fmt: skip

    def _wait(self) -> None:
        time.sleep(random.uniform(0.5, 1.0) * self._delay)
        self._delay = min(self._delay * 2, self.max_poll_s)

    def _others(self) -> dict[str, dict[str, Any]]:
        """Live locks other than ours; stale ones are deleted on the way."""
        now, live = time.time(), {}
        for ref, value in self.backend.list_refs(LOCK_PREFIX).items():
            try:
                info = json.loads(value)
            except ValueError:
                continue  # a lock being written by a foreign tool: not ours to judge
            if ref == self.name:
                continue
            if now - float(info.get("time", 0)) < self.stale_s:
                live[ref] = info
            else:  # its holder died: clear it away (unless it was renewed since we listed)
                try:
                    self.backend.swap_ref(ref, value, None)
                except (RefConflictError, ObjectNotFoundError):
                    pass
        return live
