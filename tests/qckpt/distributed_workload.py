"""Ranks for the DCP tests: a small sharded state (DTensors over a CPU device mesh,
a replicated tensor, plain values) saved and loaded through ``QckptWriter`` /
``QckptReader`` on the gloo backend. Spawned by ``test_distributed.py``; each rank
writes what it saw to ``<out>/rank<N>.json``."""

from __future__ import annotations

import faulthandler
import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from bench.distributed import leave_rank
from qckpt.distributed import QckptReader, QckptWriter


def full_state(step: int) -> dict[str, Any]:
    """The whole state at ``step`` (the same on every rank and in the test)."""
    g = torch.Generator().manual_seed(step)
    return {
        "w": torch.randn(8, 6, generator=g),
        "emb": torch.randn(4, 6, generator=g).to(torch.bfloat16),
        "bias": torch.randn(6, generator=g),
        "meta": {"step": step, "name": "tiny"},
    }


def sharded(state: dict[str, Any], mesh: Any, dim: int = 0) -> dict[str, Any]:
    """``w`` and ``emb`` sharded along ``dim`` over ``mesh``; ``bias`` replicated as a plain tensor."""
    return {"w": distribute_tensor(state["w"], mesh, [Shard(dim)]), "emb": distribute_tensor(state["emb"], mesh, [Shard(dim)]),
            "bias": state["bias"].clone(), "meta": dict(state["meta"])}  # fmt: skip


def _zeros_like(state: dict[str, Any]) -> dict[str, Any]:
    return {k: (torch.zeros_like(v) if isinstance(v, torch.Tensor) else {"step": -1, "name": ""}) for k, v in state.items()}


def rank_main(rank: int, world: int, rendezvous: str, location: str, task: str, out: str) -> None:
    faulthandler.enable()  # a rank that crashes in native code says where
    device = "cuda" if task == "cuda" else "cpu"  # "cuda": NCCL, one rank per GPU
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))  # fmt: skip
    mesh = init_device_mesh(device, (world,))
    seen: dict[str, Any] = {}
    try:
        if task in ("save", "save-other-branch"):
            branch = "main" if task == "save" else "other"
            writer = QckptWriter(location, branch)
            for step in (1, 2, 3):
                writer.step = step
                dcp.save(sharded(full_state(step), mesh), storage_writer=writer)
            seen["snapshot"] = writer.snapshot.id if writer.snapshot else None
            writer.close()
        elif task.startswith("load"):  # load or load-dim1 (another sharding than the one saved)
            dim = 1 if task == "load-dim1" else 0
            state = sharded(_zeros_like(full_state(0)), mesh, dim)
            dcp.load(state, storage_reader=QckptReader(location, "main"))
            expected = sharded(full_state(3), mesh, dim)
            seen["equal"] = {k: bool(torch.equal(_local(state[k]), _local(expected[k]))) if isinstance(state[k], torch.Tensor)
                             else state[k] == expected[k] for k in state}  # fmt: skip
        elif task == "cuda":  # a sharded CUDA run: commit (pinned staging), restore into a fresh run, train on equal
            from torch.distributed.fsdp import fully_shard

            import qckpt

            def new_run() -> qckpt.TrainingState:
                torch.manual_seed(0)
                model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Dropout(0.1), torch.nn.Linear(16, 4)).cuda()
                fully_shard(model, mesh=mesh)
                return qckpt.TrainingState(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2))

            def step(state: qckpt.TrainingState) -> float:
                loss = state.components["model"](torch.randn(8, 16, device="cuda")).square().mean()
                loss.backward()
                state.components["optimizer"].step()
                state.components["optimizer"].zero_grad()
                state.step += 1
                return float(loss)

            state, writer = new_run(), QckptWriter(location, "main")
            for _ in range(3):
                step(state)
                writer.commit(state)
            writer.close()
            expected = step(state)
            fresh = new_run()
            QckptReader(location, "main").restore(fresh)
            seen["equal"] = step(fresh) == expected  # parameters, AdamW state and the CUDA RNG all restored
        elif task == "native":  # Repository.commit / restore of a sharded TrainingState, on every rank
            from torch.distributed.fsdp import fully_shard

            import qckpt

            def new_run(hidden: int = 16) -> qckpt.TrainingState:
                torch.manual_seed(0)
                model = torch.nn.Sequential(torch.nn.Linear(16, hidden), torch.nn.Dropout(0.1), torch.nn.Linear(hidden, 4))
                fully_shard(model, mesh=mesh)
                return qckpt.TrainingState(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2))

            def step(state: qckpt.TrainingState) -> float:
                loss = state.components["model"](torch.randn(8, 16)).square().mean()
                loss.backward()
                state.components["optimizer"].step()
                state.components["optimizer"].zero_grad()
                state.step += 1
                return float(loss)

            state = new_run()
            with qckpt.Repository.open(location) as repo:
                ids = []
                for _ in range(3):
                    step(state)
                    ids.append(repo.commit(state, branch="native", metrics={"x": 1.0}).id)
                seen["ids"] = ids
                expected = step(state)
                fresh = new_run()
                seen["restored"] = repo.restore(fresh, "native").id
                seen["equal"] = step(fresh) == expected  # parameters, AdamW state and RNG restored on every rank
                wider = new_run(hidden=24)
                before = [p.full_tensor().clone() for p in wider.components["model"].parameters()]
                try:
                    repo.restore(wider, "native")
                    seen["mismatch"] = None
                except qckpt.StateMismatchError as e:
                    seen["mismatch"] = str(e)
                seen["untouched"] = all(torch.equal(a, p.full_tensor()) for a, p in zip(before, wider.components["model"].parameters()))
                for name, call in (("commit_async", lambda: repo.commit_async(state)),
                                   ("plain", lambda: repo.commit(dict(state.components["model"].state_dict())))):  # fmt: skip
                    try:
                        call()
                        seen[name] = None
                    except qckpt.UnsupportedValueError as e:
                        seen[name] = str(e)
        elif task == "die":
            writer = QckptWriter(location, "main")
            if rank == 1:
                def die(*args: Any, **kwargs: Any) -> Any:
                    os._exit(3)  # killed mid-save: after planning, before its data is written
                writer.write_data = die  # type: ignore[method-assign]
            writer.step = 4
            try:
                dcp.save(sharded(full_state(4), mesh), storage_writer=writer)
                seen["error"] = None
            except (Exception, CheckpointException) as e:  # reported to the test, which asserts on it
                seen["error"] = f"{type(e).__name__}: {e}"[:500]
            writer.close()
        if task != "die":
            dist.barrier()  # nobody tears the group down while a peer still talks (gloo aborts on a closed peer)
    finally:
        Path(out, f"rank{rank}.json").write_text(json.dumps(seen))
        if task != "die":
            dist.destroy_process_group()
    leave_rank()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t
