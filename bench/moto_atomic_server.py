"""Run moto's standalone S3 server with atomic conditional writes.

moto checks ``If-Match``/``If-None-Match`` on PutObject and DeleteObject by
reading the current object and then writing in a separate step
(``moto/s3/responses.py``, ``S3Response.put_object``/``delete_object``), so two
concurrent conditional writes can both succeed. Real S3 evaluates the condition
and writes atomically, and qckpt's ref compare-and-swap relies on that. This
launcher serializes those two handlers so the test server keeps the guarantee
real S3 gives; everything else is moto's own server, unchanged.

Usage: ``python moto_atomic_server.py -H 127.0.0.1 -p PORT`` (moto_server's arguments).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

from moto.s3.responses import S3Response
from moto.server import main

_conditional_writes = threading.Lock()


def _serialized(handler: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def run(self: Any) -> Any:
        with _conditional_writes:
            return handler(self)

    return run


S3Response.put_object = _serialized(S3Response.put_object)  # type: ignore[method-assign]
S3Response.delete_object = _serialized(S3Response.delete_object)  # type: ignore[method-assign]

if __name__ == "__main__":
    main(sys.argv[1:])
