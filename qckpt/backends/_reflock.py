"""The writer lock built from refs, for backends without a native one (S3).

Each holder creates ref ``locks/<uuid>`` holding JSON ``{"exclusive", "created",
"time", "host", "pid"}`` and renews ``time`` every ``refresh_s`` while held (a
heartbeat thread), then deletes it on release. A lock not renewed for
``stale_s`` belongs to a crashed holder: it is ignored, and whoever sees it
deletes it (a compare-and-swap on the value seen, so a lock renewed meanwhile
survives). Protocol, safe given strongly consistent listing (as S3 has):

* shared: create, then list; if a live exclusive lock exists, delete own lock,
  wait until none is left, start over;
* exclusive: create, then wait until no live shared lock and no older live
  exclusive lock remains.

If a shared and an exclusive holder both proceeded, the shared one listed
before the exclusive lock existed, so its own lock already existed when the
exclusive one listed, and the exclusive holder would have waited: a
contradiction. Writers are preferred, so GC cannot starve behind a stream of
commits. Holders' clocks must agree to well within ``stale_s``.

A holder whose heartbeat stalls (a suspended process, a partitioned network)
loses the lock in others' eyes after ``stale_s``; ``Lease.check`` tells it so
before each irreversible step, with a margin of two heartbeats.
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
    name = f"{LOCK_PREFIX}{uuid.uuid4().hex}"
    created = time.time()

    def body() -> str:
        return json.dumps({"exclusive": exclusive, "created": created, "time": time.time(),
                           "host": socket.gethostname(), "pid": os.getpid()})  # fmt: skip

    def others() -> dict[str, dict[str, Any]]:
        now, live = time.time(), {}
        for ref, value in backend.list_refs(LOCK_PREFIX).items():
            try:
                info = json.loads(value)
            except ValueError:
                continue  # a lock being written by a foreign tool: not ours to judge
            if ref == name:
                continue
            if now - float(info.get("time", 0)) < stale_s:
                live[ref] = info
            else:  # its holder died: clear it away (unless it was renewed since we listed)
                try:
                    backend.swap_ref(ref, value, None)
                except (RefConflictError, ObjectNotFoundError):
                    pass
        return live

    lease = Lease(max(stale_s - 2 * refresh_s, stale_s / 2))
    current: str | None = None
    delay = 0.02
    while current is None:
        current = body()
        lease.renewed(time.monotonic())
        backend.swap_ref(name, None, current)
        while True:
            live = others()
            if exclusive:
                blockers = [r for r, o in live.items() if not o.get("exclusive") or (o.get("created", 0), r) < (created, name)]
            else:
                blockers = [r for r, o in live.items() if o.get("exclusive")]
                if blockers:  # make way for the exclusive holder, then try again
                    backend.swap_ref(name, current, None)
                    current = None
            if not blockers:
                break
            time.sleep(random.uniform(0.5, 1.0) * delay)
            delay = min(delay * 2, max_poll_s)
            if exclusive:  # waiting: keep our own lock fresh, or others would clear it away
                sent, new = time.monotonic(), body()
                backend.swap_ref(name, current, new)
                current = new
                lease.renewed(sent)
            if current is None:
                while any(o.get("exclusive") for o in others().values()):
                    time.sleep(random.uniform(0.5, 1.0) * delay)
                    delay = min(delay * 2, max_poll_s)
                break

    stop = threading.Event()
    failure: list[BaseException] = []
    holder = {"value": current}

    def refresh() -> None:
        while not stop.wait(refresh_s):
            try:
                sent, new = time.monotonic(), body()
                backend.swap_ref(name, holder["value"], new)
                holder["value"] = new
                lease.renewed(sent)
            except (BackendError, RefConflictError) as e:  # surfaced to the holder at release
                failure.append(e)
                return

    refresher = threading.Thread(target=refresh, name="qckpt-lock-refresh", daemon=True)
    refresher.start()
    try:
        yield lease
    finally:
        stop.set()
        refresher.join()
        try:
            backend.swap_ref(name, holder["value"], None)
        except RefConflictError:  # cleared away as stale while we stalled; the lease checks said so
            pass
    if failure:
        raise BackendError(f"{backend.uri}: the writer lock could not be kept fresh: {failure[0]}") from failure[0]
