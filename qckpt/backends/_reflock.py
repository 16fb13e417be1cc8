"""The writer lock built from refs, for backends without a native one (S3).

Each holder creates ref ``locks/<uuid>`` holding JSON ``{"exclusive", "created",
"time", "host", "pid"}``, refreshes ``time`` every ``refresh_s`` while held, and
deletes it on release. Locks not refreshed for ``stale_s`` (a crashed holder)
are ignored. Protocol, safe given strongly consistent listing (as S3 has):

* shared: create, then list; if a live exclusive lock exists, delete own lock,
  wait until none is left, start over;
* exclusive: create, then wait until no live shared lock and no older live
  exclusive lock remains.

If a shared and an exclusive holder both proceeded, the shared one listed
before the exclusive lock existed, so its own lock already existed when the
exclusive one listed, and the exclusive holder would have waited: a
contradiction. Writers are preferred, so GC cannot starve behind a stream of
commits. Holders' clocks must agree to well within ``stale_s``.
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

from qckpt.errors import BackendError, RefConflictError

if TYPE_CHECKING:
    from qckpt.backends._base import Backend

LOCK_PREFIX = "locks/"


@contextmanager
def ref_lock(
    backend: Backend, *, exclusive: bool, refresh_s: float = 15.0, stale_s: float = 300.0, max_poll_s: float = 1.0
) -> Iterator[None]:
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
            if ref != name and now - float(info.get("time", 0)) < stale_s:
                live[ref] = info
        return live

    current: str | None = None
    delay = 0.02
    while current is None:
        current = body()
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
                new = body()
                backend.swap_ref(name, holder["value"], new)
                holder["value"] = new
            except (BackendError, RefConflictError) as e:  # surfaced to the holder at release
                failure.append(e)
                return

    refresher = threading.Thread(target=refresh, name="qckpt-lock-refresh", daemon=True)
    refresher.start()
    try:
        yield
    finally:
        stop.set()
        refresher.join()
        backend.swap_ref(name, holder["value"], None)
    if failure:
        raise BackendError(f"{backend.uri}: the writer lock could not be kept fresh: {failure[0]}") from failure[0]
