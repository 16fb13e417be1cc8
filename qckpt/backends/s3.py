"""A backend on Amazon S3 or any S3-compatible server, via boto3.

Layout under ``s3://bucket/prefix/``: blob keys as objects (``packs/<id>.pack``
...), refs under ``refs/``. Whole-object writes are atomic in S3; refs change
by conditional writes (``If-None-Match: *`` to create, ``If-Match: <etag>`` to
replace or delete). Each ref's last seen value and ETag are remembered, so a
compare-and-swap on a value this process read or wrote needs no read first and
listing refs fetches only those whose ETag changed (the condition on the write,
not the memory, is what makes the swap safe). Retries are not done here (botocore's are disabled): every
failure is classified as ``TransientBackendError`` (throttling, 5xx, timeouts,
dropped connections; wrap in ``RetryingBackend``) or a permanent
``BackendError`` (no such bucket, access denied) that fails fast.
Credentials come from boto3's standard chain and never appear in messages.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Sequence
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
import botocore.session
from boto3.s3.transfer import TransferConfig

from qckpt.backends._base import REFS_NAMESPACE, Backend, Buffer, check_blob_key, check_key, joined
from qckpt.errors import (
    AlreadyExistsError,
    BackendError,
    InvalidInputError,
    ObjectNotFoundError,
    RefConflictError,
    TransientBackendError,
)

_REFS = REFS_NAMESPACE + "/"
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                    "InternalError", "ServiceUnavailable", "503", "500", "502", "504"}  # fmt: skip
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
_SWAP_ATTEMPTS = 8
_TRANSFER = TransferConfig(multipart_threshold=32 << 20, multipart_chunksize=16 << 20, max_concurrency=8)


_loader_lock = threading.Lock()
_loader: Any = None


def _new_session() -> boto3.session.Session:
    """A boto3 session of its own (credentials and configuration resolved afresh)
    sharing one process-wide loader of service models: loading S3's model anew
    costs ~80 ms per repository opened."""
    global _loader
    core = botocore.session.get_session()
    with _loader_lock:
        if _loader is None:
            _loader = core.get_component("data_loader")
        else:
            core.register_component("data_loader", _loader)
    return boto3.session.Session(botocore_session=core)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (``bucket``, ``some/prefix/``)."""
    rest = uri.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    if not uri.startswith("s3://") or not bucket:
        raise InvalidInputError(f"invalid S3 URI {uri!r}: use s3://bucket/prefix")
    prefix = prefix.strip("/")
    if prefix:
        check_key(prefix)
    return bucket, f"{prefix}/" if prefix else ""


class S3Backend(Backend):
    """Objects in one bucket under a prefix. Thread-safe (boto3 clients are).

    ``endpoint_url`` (or ``AWS_ENDPOINT_URL``, which boto3 reads itself) selects
    an S3-compatible server; ``region`` and credentials follow boto3's usual
    configuration chain unless given.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        client: Any = None,
        timeout_s: float = 60.0,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self.uri = f"s3://{bucket}/{self.prefix}"
        config = botocore.config.Config(
            retries={"total_max_attempts": 1},  # retries belong to RetryingBackend
            connect_timeout=timeout_s, read_timeout=timeout_s, max_pool_connections=32,
        )  # fmt: skip
        self.client = client or _new_session().client(
            "s3", endpoint_url=endpoint_url, region_name=region, config=config
        )
        self._seen_refs: dict[str, tuple[str, str]] = {}  # ref -> (value, ETag) last read or written here
        self._seen_lock = threading.Lock()
        self.requests: dict[str, int] = {}  # operation -> count, for request-economy reports
        self.bytes_sent = 0
        self.bytes_received = 0

    # -- request plumbing ------------------------------------------------------------
    def _call(self, operation: str, key: str, **kwargs: Any) -> Any:
        self.requests[operation] = self.requests.get(operation, 0) + 1
        try:
            return getattr(self.client, operation)(Bucket=self.bucket, **kwargs)
        except botocore.exceptions.ClientError as e:
            raise self._translate(e, key) from None
        except (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError) as e:
            raise TransientBackendError(f"{self.uri}: {operation} {key!r}: connection failed: {type(e).__name__}") from None
        except botocore.exceptions.NoCredentialsError:
            raise BackendError(f"{self.uri}: no AWS credentials found (configure the standard AWS credential chain)") from None

    def _translate(self, e: botocore.exceptions.ClientError, key: str) -> Exception:
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        where = f"{self.uri}: {key!r}"
        if code in _MISSING_CODES:
            return ObjectNotFoundError(f"{self.uri}: no object {key!r}")
        if code == "PreconditionFailed" or status == 412:
            return _PreconditionFailed(where)
        if code == "NoSuchBucket":
            return BackendError(f"{self.uri}: bucket {self.bucket!r} does not exist")
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "ExpiredToken"):
            return BackendError(f"{where}: access denied ({code}); check credentials and bucket policy")
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            return TransientBackendError(f"{where}: S3 error {code or status}, may succeed when retried")
        return BackendError(f"{where}: S3 error {code or status}")

    def _key(self, key: str) -> str:
        return self.prefix + check_blob_key(key)

    # -- blobs -------------------------------------------------------------------------
    def put(self, key: str, data: Buffer | Sequence[Buffer], *, exclusive: bool = False) -> None:
        full = self._key(key)
        body = bytes(joined(data))
        self.bytes_sent += len(body)
        if exclusive:
            try:
                self._call("put_object", key, Key=full, Body=body, IfNoneMatch="*")
            except _PreconditionFailed:
                raise AlreadyExistsError(f"{self.uri}: {key!r} exists already") from None
        elif len(body) >= _TRANSFER.multipart_threshold:
            self.requests["multipart_upload"] = self.requests.get("multipart_upload", 0) + 1
            try:
                self.client.upload_fileobj(io.BytesIO(body), self.bucket, full, Config=_TRANSFER)
            except botocore.exceptions.ClientError as e:
                raise self._translate(e, key) from None
            except (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError, OSError) as e:
                raise TransientBackendError(f"{self.uri}: upload {key!r} failed: {type(e).__name__}") from None
        else:
            self._call("put_object", key, Key=full, Body=body)

    def get(self, key: str) -> bytes:
        body = self._call("get_object", key, Key=self._key(key))["Body"]
        data = self._streamed(key, body.read)
        self.bytes_received += len(data)
        return data

    def _streamed(self, key: str, read: Callable[[], bytes]) -> bytes:
        """``read()`` of a response body, a dropped stream being a transient error (retried)."""
        try:
            return read()
        except (botocore.exceptions.ReadTimeoutError, botocore.exceptions.ResponseStreamingError,
                botocore.exceptions.IncompleteReadError) as e:  # fmt: skip
            raise TransientBackendError(f"{self.uri}: {key!r}: the download broke off: {type(e).__name__}") from None

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        try:
            response = self._call("get_object", key, Key=self._key(key), Range=f"bytes={offset}-{offset + length - 1}")
        except BackendError as e:
            if "InvalidRange" in str(e):
                return b""  # the range starts past the end
            raise
        data = self._streamed(key, response["Body"].read)
        self.bytes_received += len(data)
        return data

    def _head(self, key: str) -> dict[str, Any]:
        return self._call("head_object", key, Key=self._key(key))

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
            return True
        except ObjectNotFoundError:
            return False

    def size(self, key: str) -> int:
        return int(self._head(key)["ContentLength"])

    def _list(self, prefix: str) -> dict[str, str]:
        """Key -> ETag of every object under ``prefix``."""
        found, token = {}, None
        while True:
            extra = {"ContinuationToken": token} if token else {}
            page = self._call("list_objects_v2", prefix, Prefix=self.prefix + prefix, **extra)
            found.update((o["Key"].removeprefix(self.prefix), o.get("ETag", "")) for o in page.get("Contents", []))
            if not page.get("IsTruncated"):
                return found
            token = page["NextContinuationToken"]

    def list(self, prefix: str) -> list[str]:
        return sorted(k for k in self._list(prefix) if not k.startswith(_REFS))

    def delete(self, key: str) -> None:
        self._head(key)  # S3 deletes missing keys silently; the contract says ObjectNotFoundError
        self._call("delete_object", key, Key=self._key(key))

    # -- refs ----------------------------------------------------------------------------
    def _remember(self, name: str, value: str | None, etag: str | None) -> None:
        with self._seen_lock:
            if value is None or etag is None:
                self._seen_refs.pop(name, None)
            else:
                self._seen_refs[name] = (value, etag)

    def _read_ref(self, name: str) -> tuple[str | None, str | None]:
        """(value, etag) of a ref, or (None, None) when absent; always a fresh read."""
        try:
            response = self._call("get_object", name, Key=self.prefix + _REFS + check_key(name))
        except ObjectNotFoundError:
            self._remember(name, None, None)
            return None, None
        value = response["Body"].read().decode("utf-8", errors="replace").strip()
        self._remember(name, value, response["ETag"])
        return value, response["ETag"]

    def read_ref(self, name: str) -> str | None:
        return self._read_ref(name)[0]

    def list_refs(self, prefix: str) -> dict[str, str]:
        found = {}
        for key, etag in self._list(_REFS + prefix).items():
            name = key.removeprefix(_REFS)
            with self._seen_lock:
                seen = self._seen_refs.get(name)
            value = seen[0] if seen is not None and seen[1] == etag else self.read_ref(name)
            if value is not None:
                found[name] = value
        return found

    def swap_ref(self, name: str, expected: str | None, new: str | None) -> None:
        """Compare-and-swap with S3 conditional writes (``If-None-Match``/``If-Match``),
        conditioned on the ETag this process last saw holding ``expected`` (read
        first only when it saw none); a lost condition is re-read, and retried when
        the ref still holds ``expected`` (rewritten with the same value meanwhile)."""
        key = self.prefix + _REFS + check_key(name)
        with self._seen_lock:
            seen = self._seen_refs.get(name)
        etag = seen[1] if seen is not None and seen[0] == expected else None
        if (expected is not None and etag is None) or (expected is None and new is None):
            actual, etag = self._read_ref(name)
            if actual != expected:
                raise RefConflictError(name, expected, actual)
            if actual is None and new is None:
                return  # absent, as asked
        for _ in range(_SWAP_ATTEMPTS):
            try:
                if new is None:
                    self._call("delete_object", name, Key=key, IfMatch=etag)
                    self._remember(name, None, None)
                else:
                    condition = {"IfMatch": etag} if etag is not None else {"IfNoneMatch": "*"}
                    response = self._call("put_object", name, Key=key, Body=(new + "\n").encode(), **condition)
                    self._remember(name, new, response.get("ETag"))
                return
            except (_PreconditionFailed, ObjectNotFoundError):  # changed (or deleted) since we saw it
                actual, etag = self._read_ref(name)
                if actual != expected:
                    raise RefConflictError(name, expected, actual) from None
        raise RefConflictError(name, expected, self.read_ref(name))  # rewritten with equal values, again and again


class _PreconditionFailed(BackendError):
    """A conditional S3 write lost its condition (internal; callers map it to a conflict)."""
