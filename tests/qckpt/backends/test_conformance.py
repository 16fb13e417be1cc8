"""Every backend qckpt ships runs the conformance suite of ``qckpt.testing``."""

from __future__ import annotations

from pathlib import Path

import botocore.exceptions
import pytest

from bench.s3server import new_bucket
from qckpt.backends import Backend, LocalBackend, MemoryBackend, RetryingBackend, S3Backend
from qckpt.testing import BackendConformance


class TestMemoryBackend(BackendConformance):
    def make_backend(self, tmp_path: Path, request: pytest.FixtureRequest) -> Backend:
        return MemoryBackend("conformance")

    def raw_put(self, backend: Backend, key: str, data: bytes) -> None:
        assert isinstance(backend, MemoryBackend)
        backend._blobs[key] = data

    def raw_get(self, backend: Backend, key: str) -> bytes | None:
        assert isinstance(backend, MemoryBackend)
        return backend._blobs.get(key)


class TestLocalBackend(BackendConformance):
    def make_backend(self, tmp_path: Path, request: pytest.FixtureRequest) -> Backend:
        return LocalBackend(tmp_path / "store")

    def raw_put(self, backend: Backend, key: str, data: bytes) -> None:
        assert isinstance(backend, LocalBackend)
        path = backend.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def raw_get(self, backend: Backend, key: str) -> bytes | None:
        assert isinstance(backend, LocalBackend)
        path = backend.root / key
        return path.read_bytes() if path.is_file() else None


class TestS3Backend(BackendConformance):
    """S3 through the retrying wrapper, as ``s3://`` locations are opened."""

    def make_backend(self, tmp_path: Path, request: pytest.FixtureRequest) -> Backend:
        bucket = new_bucket(request.getfixturevalue("s3_endpoint"))
        return RetryingBackend(S3Backend(bucket, "conformance/prefix"))

    @staticmethod
    def _s3(backend: Backend) -> S3Backend:
        assert isinstance(backend, RetryingBackend) and isinstance(backend.inner, S3Backend)
        return backend.inner

    def raw_put(self, backend: Backend, key: str, data: bytes) -> None:
        s3 = self._s3(backend)
        s3.client.put_object(Bucket=s3.bucket, Key=s3.prefix + key, Body=data)

    def raw_get(self, backend: Backend, key: str) -> bytes | None:
        s3 = self._s3(backend)
        try:
            return s3.client.get_object(Bucket=s3.bucket, Key=s3.prefix + key)["Body"].read()
        except botocore.exceptions.ClientError:
            return None
