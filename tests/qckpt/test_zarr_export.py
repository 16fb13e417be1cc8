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
