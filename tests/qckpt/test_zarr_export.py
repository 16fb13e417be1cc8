"""Exported snapshots, and snapshots opened as zarr stores, read back with plain
zarr-python equal the tensors, bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import qckpt


@pytest.mark.parametrize("how", ["export", "store"])
def test_export_and_store_read_back_with_plain_zarr(repo: qckpt.Repository, tmp_path: Path, how: str) -> None:
    tree = {
        "model": {"fc.weight": torch.randn(5, 7), "half": torch.randn(3).half(), "bf": torch.randn(2, 2).bfloat16()},
        "count": torch.tensor(3), "mask": torch.tensor([True, False]), "empty": torch.empty(0, 4),
        "np": np.arange(6, dtype=np.int16).reshape(2, 3), "lr": 0.1,
    }  # fmt: skip
    snap = repo.commit(tree, step=4)
    if how == "export":
        assert repo.export_zarr("main", tmp_path / "out.zarr") == 7
        root = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    else:
        root = zarr.open_group(repo.zarr_store("main"), mode="r")
        assert sorted(root.keys()) == ["count", "empty", "mask", "model", "np"]
        assert np.array_equal(root["model/fc.weight"][1:3, 2:5], tree["model"]["fc.weight"][1:3, 2:5].numpy())
    assert root.attrs["qckpt"]["snapshot"] == snap.id and root.attrs["qckpt"]["step"] == 4
    assert np.array_equal(root["model/fc.weight"][:], tree["model"]["fc.weight"].numpy())
    assert root["model/half"].dtype == np.float16 and np.array_equal(root["model/half"][:], tree["model"]["half"].numpy())
    bf = root["model/bf"]
    assert bf.attrs["qckpt_dtype"] == "bfloat16"
    assert np.array_equal(bf[:], tree["model"]["bf"].view(torch.int16).numpy().view(np.uint16))
    assert root["count"][()] == 3 and root["mask"][:].tolist() == [True, False] and root["empty"].shape == (0, 4)
    assert np.array_equal(root["np"][:], tree["np"])
    if how == "store":
        return
    with pytest.raises(qckpt.AlreadyExistsError):
        repo.export_zarr("main", tmp_path / "out.zarr")


@pytest.mark.parametrize("name", ["out.zarr", "out.pt", "out.safetensors"])
def test_an_export_creates_missing_parent_directories_and_refuses_a_file_as_one(tmp_path: Path, name: str) -> None:
    with qckpt.Repository.init(tmp_path / "r") as repo:
        repo.commit({"w": torch.arange(6.0)})
        assert repo.export("main", tmp_path / "new" / "dir" / name) == 1
        (tmp_path / "afile").write_bytes(b"mine")
        with pytest.raises(qckpt.InvalidInputError, match="afile is not a directory"):
            repo.export("main", tmp_path / "afile" / name)
        with pytest.raises(qckpt.InvalidInputError, match="local path"):  # Path would make a directory named 's3:'
            repo.export("main", f"s3://bucket/{name}")
    assert (tmp_path / "new" / "dir" / name).exists() and (tmp_path / "afile").read_bytes() == b"mine"
    assert sorted(p.name for p in (tmp_path / "new" / "dir").iterdir()) == [name]  # no temporary left beside it


@pytest.mark.parametrize("name", ["out.zarr", "out.pt", "out.safetensors"])
def test_an_export_that_fails_leaves_nothing_that_looks_finished(tmp_path: Path, name: str) -> None:
    with qckpt.Repository.init(tmp_path / "r", warm=False) as repo:  # the packs are all there is
        repo.commit({"a": torch.arange(64.0), "b": torch.full((64,), 7.0)})
    pack = next((tmp_path / "r" / "packs").iterdir())
    data = bytearray(pack.read_bytes())
    data[len(data) // 3] ^= 0x40  # damages one of the two tensors: the export fails part way
    pack.write_bytes(bytes(data))
    (tmp_path / "out").mkdir()
    with qckpt.Repository.open(tmp_path / "r") as repo, pytest.raises(qckpt.IntegrityError):
        repo.export("main", tmp_path / "out" / name)
    assert list((tmp_path / "out").iterdir()) == []  # neither a partial export nor its temporary
