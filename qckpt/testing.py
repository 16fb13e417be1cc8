"""Tools for people who write qckpt backends: the backend conformance suite.

Every backend qckpt ships runs this suite (``tests/qckpt/backends``); a
third-party backend can run it too::

    from qckpt.testing import BackendConformance

    class TestMyBackend(BackendConformance):
        def make_backend(self, tmp_path, request):
            return MyBackend(...)

        def raw_put(self, backend, key, data):
            ...  # write ``data`` under ``key`` without going through ``backend``

        def raw_get(self, backend, key):
            ...  # the bytes under ``key`` read without ``backend``, or None

The raw hooks check the backend against its storage, not only against itself
(as zarr's ``StoreTests`` do): what ``put`` wrote must really be there, and
what was put there by other means must be readable. Needs pytest.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from qckpt.backends import Backend, Capabilities
from qckpt.errors import AlreadyExistsError, InvalidInputError, ObjectNotFoundError, RefConflictError


class BackendConformance:
    """The backend contract (``qckpt.backends.Backend``) as tests; subclass it in a
    test module with a name starting with ``Test`` and implement the three hooks."""

    def make_backend(self, tmp_path: Path, request: pytest.FixtureRequest) -> Backend:
        """A new, empty backend."""
        raise NotImplementedError

    def raw_put(self, backend: Backend, key: str, data: bytes) -> None:
        """Store ``data`` under blob ``key`` bypassing ``backend``."""
        raise NotImplementedError

    def raw_get(self, backend: Backend, key: str) -> bytes | None:
        """The bytes stored under blob ``key``, read bypassing ``backend`` (None if absent)."""
        raise NotImplementedError

    @pytest.fixture
    def backend(self, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Backend]:
        b = self.make_backend(tmp_path, request)
        yield b
        b.close()

    # -- against the storage itself, through the raw hooks ----------------------------
    def test_put_reaches_the_storage(self, backend: Backend) -> None:
        backend.put("packs/a.pack", b"stored bytes")
        assert self.raw_get(backend, "packs/a.pack") == b"stored bytes"
        assert self.raw_get(backend, "packs/b.pack") is None

    def test_get_reads_the_storage(self, backend: Backend) -> None:
        self.raw_put(backend, "snapshots/x", b"written elsewhere")
        assert backend.get("snapshots/x") == b"written elsewhere"
        assert backend.get_range("snapshots/x", 8, 4) == b"elsewhere"[:4]
        assert backend.list("snapshots/") == ["snapshots/x"] and backend.size("snapshots/x") == 17

    def test_delete_removes_from_the_storage(self, backend: Backend) -> None:
        self.raw_put(backend, "k", b"v")
        backend.delete("k")
        assert self.raw_get(backend, "k") is None

    def test_exclusive_put_sees_what_the_storage_holds(self, backend: Backend) -> None:
        self.raw_put(backend, "config", b"theirs")
        with pytest.raises(AlreadyExistsError):
            backend.put("config", b"ours", exclusive=True)
        assert self.raw_get(backend, "config") == b"theirs"

    # -- the contract ------------------------------------------------------------------
    def test_capabilities_are_consistent(self, backend: Backend) -> None:
        caps = backend.capabilities
        assert isinstance(caps, Capabilities) and caps.index in ("memory", "local", "cache")
        assert (caps.index == "local") == (caps.local_dir is not None)

    def test_refs_namespace_is_reserved(self, backend: Backend) -> None:
        for call in (lambda: backend.put("refs/heads/main", b"x"), lambda: backend.get("refs/heads/main"),
                     lambda: backend.exists("refs/x"), lambda: backend.delete("refs/x")):  # fmt: skip
            with pytest.raises(InvalidInputError, match="reserved"):
                call()
        assert backend.read_ref("heads/main") is None

    def test_put_get_roundtrip(self, backend: Backend) -> None:
        backend.put("packs/a.pack", b"hello")
        backend.put("empty", b"")
        assert backend.get("packs/a.pack") == b"hello"
        assert backend.get("empty") == b""
        assert backend.size("packs/a.pack") == 5
        assert backend.exists("packs/a.pack") and not backend.exists("packs/b.pack")


    def test_put_accepts_memoryview_and_bytearray(self, backend: Backend) -> None:
        backend.put("a", memoryview(b"xyz")[1:])
        backend.put("b", bytearray(b"123"))
        assert backend.get("a") == b"yz" and backend.get("b") == b"123"

    def test_put_stores_a_sequence_of_buffers_back_to_back(self, backend: Backend) -> None:
        backend.put("packs/p", [b"one ", bytearray(b"two "), memoryview(b"three")])
        assert self.raw_get(backend, "packs/p") == b"one two three"
        backend.put("packs/q", [b"only", b""], exclusive=True)
        with pytest.raises(AlreadyExistsError):
            backend.put("packs/q", [b"again"], exclusive=True)
        assert backend.get("packs/q") == b"only"


    def test_get_range(self, backend: Backend) -> None:
        backend.put("k", bytes(range(100)))
        assert backend.get_range("k", 10, 5) == bytes(range(10, 15))
        assert backend.get_range("k", 95, 10) == bytes(range(95, 100))  # short at the end


    def test_put_cache_stores_and_replaces_whole_values(self, backend: Backend) -> None:
        backend.put_cache("warm/a", b"first")
        assert self.raw_get(backend, "warm/a") == b"first"
        backend.put_cache("warm/a", bytearray(b"second value"))
        assert backend.get("warm/a") == b"second value" and backend.list("warm/") == ["warm/a"]
        backend.put_cache("warm/a", [b"in ", bytearray(b"three "), memoryview(b"parts")])  # stored back to back
        assert self.raw_get(backend, "warm/a") == b"in three parts"


    def test_map_reads_the_whole_value_and_private_copies_stay_private(self, backend: Backend) -> None:
        backend.put("k", bytes(range(200)))
        blob = backend.map("k")
        assert blob.view.readonly and bytes(blob.view) == bytes(range(200))
        first, second = blob.private(), blob.private()
        first[0:3] = b"abc"
        assert not first.readonly and bytes(second[:3]) == bytes(range(3))
        assert bytes(blob.view[:3]) == bytes(range(3)) and backend.get("k") == bytes(range(200))
        backend.put("k", b"replaced")  # a new value under the key never changes a mapping already made
        assert bytes(blob.view) == bytes(range(200)) and bytes(blob.private()) == bytes(range(200))
        part = backend.map("k", whole=False)  # for a caller that reads part of it: the same bytes
        assert part.view.readonly and bytes(part.view) == b"replaced" and bytes(part.private()) == b"replaced"


    def test_missing_keys_raise_not_found(self, backend: Backend) -> None:
        for call in (lambda: backend.get("nope"), lambda: backend.map("nope"), lambda: backend.get_range("nope", 0, 1),
                     lambda: backend.size("nope"), lambda: backend.delete("nope")):  # fmt: skip
            with pytest.raises(ObjectNotFoundError) as info:
                call()
            assert isinstance(info.value, KeyError)
            assert "nope" in str(info.value)


    def test_put_again_same_content_is_harmless(self, backend: Backend) -> None:
        backend.put("k", b"v")
        backend.put("k", b"v")
        assert backend.get("k") == b"v"


    def test_exclusive_put(self, backend: Backend) -> None:
        backend.put("config", b"1", exclusive=True)
        with pytest.raises(AlreadyExistsError):
            backend.put("config", b"2", exclusive=True)
        assert backend.get("config") == b"1"


    def test_list_by_prefix_sorted(self, backend: Backend) -> None:
        for key in ("snapshots/b", "snapshots/a", "manifests/a", "snap"):
            backend.put(key, b"x")
        assert backend.list("snapshots/") == ["snapshots/a", "snapshots/b"]
        assert backend.list("snapshots/a") == ["snapshots/a"]
        assert backend.list("nothing/") == []
        assert backend.list("") == ["manifests/a", "snap", "snapshots/a", "snapshots/b"]


    def test_refs_are_not_blobs(self, backend: Backend) -> None:
        backend.swap_ref("heads/main", None, "abc")
        assert backend.list("") == []


    def test_delete(self, backend: Backend) -> None:
        backend.put("k", b"v")
        backend.delete("k")
        assert not backend.exists("k")


    @pytest.mark.parametrize("key", ["", "/abs", "a/../b", "..", "a//b", ".hidden", "a/.tmp", "a b", "a\x00", "a\\b"])
    def test_unsafe_keys_rejected(self, backend: Backend, key: str) -> None:
        with pytest.raises(InvalidInputError):
            backend.put(key, b"x")
        with pytest.raises(InvalidInputError):
            backend.swap_ref(key, None, "x")


    def test_ref_create_update_delete(self, backend: Backend) -> None:
        assert backend.read_ref("heads/main") is None
        backend.swap_ref("heads/main", None, "a1")
        backend.swap_ref("heads/main", "a1", "b2")
        backend.swap_ref("tags/v1", None, "a1")
        assert backend.read_ref("heads/main") == "b2"
        assert backend.list_refs("heads/") == {"heads/main": "b2"}
        assert backend.list_refs("") == {"heads/main": "b2", "tags/v1": "a1"}
        backend.swap_ref("heads/main", "b2", None)
        assert backend.read_ref("heads/main") is None
        assert backend.list_refs("heads/") == {}


    def test_ref_conflicts_leave_ref_unchanged(self, backend: Backend) -> None:
        backend.swap_ref("heads/main", None, "a1")
        with pytest.raises(RefConflictError) as info:
            backend.swap_ref("heads/main", None, "zz")  # create over existing
        assert info.value.actual == "a1"
        with pytest.raises(RefConflictError):
            backend.swap_ref("heads/main", "stale", "zz")
        with pytest.raises(RefConflictError):
            backend.swap_ref("heads/other", "a1", "zz")  # update of an absent ref
        with pytest.raises(RefConflictError):
            backend.swap_ref("heads/main", "stale", None)  # delete with a stale view
        assert backend.read_ref("heads/main") == "a1"


    def test_concurrent_compare_and_swap_loses_nothing(self, backend: Backend) -> None:
        """Threads increment a counter ref by CAS with retry; every increment must land."""
        backend.swap_ref("heads/counter", None, "0")
        per_thread, threads = 15, 6
        errors: list[BaseException] = []

        def work() -> None:
            try:
                for _ in range(per_thread):
                    while True:
                        current = backend.read_ref("heads/counter")
                        try:
                            backend.swap_ref("heads/counter", current, str(int(current or 0) + 1))
                            break
                        except RefConflictError:
                            continue
            except BaseException as e:  # surfaced below
                errors.append(e)

        workers = [threading.Thread(target=work) for _ in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert not errors
        assert backend.read_ref("heads/counter") == str(per_thread * threads)


    def test_writer_lock_shared_and_exclusive(self, backend: Backend) -> None:
        """Shared holders coexist; an exclusive holder waits for them and excludes them."""
        events: list[str] = []
        shared_in = threading.Event()
        release_shared = threading.Event()

        def shared_holder() -> None:
            with backend.lock(exclusive=False):
                with backend.lock(exclusive=False):  # a second shared holder does not block
                    events.append("shared")
                    shared_in.set()
                    release_shared.wait(5)
                events.append("shared released")

        def exclusive_holder() -> None:
            shared_in.wait(5)
            with backend.lock(exclusive=True):
                events.append("exclusive")

        threads = [threading.Thread(target=shared_holder), threading.Thread(target=exclusive_holder)]
        for t in threads:
            t.start()
        shared_in.wait(5)
        threading.Event().wait(0.2)  # give the exclusive holder time to (wrongly) get in
        assert events == ["shared"]
        release_shared.set()
        for t in threads:
            t.join(5)
        assert events == ["shared", "shared released", "exclusive"]
