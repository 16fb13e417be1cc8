"""``python -m bench storage``: stored bytes and save/restore time of frequent checkpoints.

Trains the reference model (AdamW, warm-up + cosine LR, dropout, real text)
and, at every checkpoint, saves the same training state with each method,
side by side in one process:

* ``torch.save``: one file per checkpoint;
* ``torch.save+zstd``: the same bytes compressed with zstd (level 3, its default);
* ``safetensors``: tensors in a safetensors file, the rest of the tree as JSON metadata;
* ``dcp``: ``torch.distributed.checkpoint.save`` (single process, filesystem writer);
* ``qckpt-plain``: a repository with ``max_chain=1`` (dedup + shuffle + zstd only);
* ``qckpt``: a repository with every codec (deltas, optimizer-aware predictions);
* ``qckpt-lossy<B>`` (with ``--lossy B``, default 10): the same, every commit on a
  side branch through the lossy tier (floats rounded to B mantissa bits); not
  lossless, so it is reported with the largest relative error measured on the
  latest snapshot against the training state, next to the stated bound.

Scenarios: ``every_step`` (a checkpoint after every optimizer step),
``every_10`` (after every tenth step) and ``frozen_90`` (fine-tuning with 90%
of the parameters frozen, every step). For each method: total bytes stored,
everything written (``bytes_written``: for qckpt the history plus every warm
copy written, most of them replaced since), mean save time, and the time to
restore the latest, a middle and the oldest checkpoint in a fresh process
(``bench.fresh``; best of 3, each opening its reader anew, every tensor's
pages touched; qckpt reads the latest from its warm copy, older ones from
their delta chains); ``restore_latest_hot_s`` is the restore of the latest in
the writing process, from the hot tier. With ``--chains``, ``every_step`` is also run with other
``max_chain`` values (methods ``qckpt-k<K>``), the size/restore trade-off that
chose the default. Ratios are ours / theirs, both measured in this run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import zstandard

import qckpt
from bench.s3server import CREDENTIALS, moto_server, new_bucket
from bench.fresh import restore_times, touch
from bench.workload import Trainer, WarmupCosine
from qckpt.format.tree import decode_tree, encode_tree

SCENARIOS = ("every_step", "every_10", "frozen_90")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="3M model, 12 checkpoints per scenario (under 2 minutes)")
    parser.add_argument("--size", default=None, help="model size (default: 10m, or 3m with --quick)")
    parser.add_argument("--commits", type=int, default=None, help="checkpoints per scenario (default 60, 12 with --quick)")
    parser.add_argument("--chains", default="", help="comma-separated extra max_chain values to sweep on every_step")
    parser.add_argument("--lossy", type=int, default=10, metavar="BITS",
                        help="mantissa bits of the qckpt-lossy method (default 10; 0 leaves it out)")
    parser.add_argument("--backend", choices=("local", "s3"), default="local", help="where qckpt repositories live")
    parser.add_argument("--json", type=Path, help="also write the results here")


def _tensor_table(tree: Any) -> tuple[str, dict[str, torch.Tensor]]:
    """The tree as JSON text plus its tensors by index (what safetensors can hold)."""
    encoded, leaves = encode_tree(tree)
    tensors = {}
    for i, leaf in enumerate(leaves):
        value = leaf.value if isinstance(leaf.value, torch.Tensor) else torch.from_numpy(leaf.value)
        tensors[f"t{i}"] = value.detach().contiguous()
    return json.dumps(encoded), tensors


class Method:
    """One way to store checkpoints: ``save`` each state (its timing includes capturing
    the state: ``state_dict()`` calls, once per method), report bytes, ``restore`` one."""

    name: str

    def save(self, state: qckpt.TrainingState) -> None: ...

    def bytes(self) -> int: ...

    def bytes_written(self) -> int:
        """Everything ever written (more than ``bytes`` where something is replaced)."""
        return self.bytes()

    def restore(self, index: int, template: Any) -> None: ...

    def close(self) -> None: ...


class FileMethod(Method):
    """File-per-checkpoint methods."""

    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        self.root = root
        root.mkdir(parents=True)
        self.paths: list[Path] = []

    def save(self, state: qckpt.TrainingState) -> None:
        self.write(state.capture())

    def write(self, tree: Any) -> None: ...

    def bytes(self) -> int:
        return sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file())

    def _next(self) -> Path:
        path = self.root / f"ckpt{len(self.paths):05d}"
        self.paths.append(path)
        return path


class TorchSave(FileMethod):
    def write(self, tree: Any) -> None:
        torch.save(tree, self._next())

    def restore(self, index: int, template: Any) -> None:
        touch(torch.load(self.paths[index], weights_only=False))


class TorchSaveZstd(FileMethod):
    def write(self, tree: Any) -> None:
        buffer = io.BytesIO()
        torch.save(tree, buffer)
        self._next().write_bytes(zstandard.ZstdCompressor(level=3).compress(buffer.getbuffer()))

    def restore(self, index: int, template: Any) -> None:
        data = zstandard.ZstdDecompressor().decompress(self.paths[index].read_bytes())
        touch(torch.load(io.BytesIO(data), weights_only=False))


class Safetensors(FileMethod):
    def write(self, tree: Any) -> None:
        from safetensors.torch import save_file

        text, tensors = _tensor_table(tree)
        save_file(tensors, str(self._next()), metadata={"tree": text})

    def restore(self, index: int, template: Any) -> None:
        from safetensors import safe_open

        with safe_open(str(self.paths[index]), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            encoded = json.loads(f.metadata()["tree"])
        touch(decode_tree(encoded, lambda i: tensors[f"t{i}"]))


class Dcp(FileMethod):
    def write(self, tree: Any) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(tree, checkpoint_id=self._next())

    def restore(self, index: int, template: Any) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.load(template, checkpoint_id=self.paths[index])


class Qckpt(Method):
    def __init__(self, name: str, location: str, max_chain: int | None, lossy: qckpt.LossyTier | None = None) -> None:
        self.name = name
        self.location = location
        self.repo = qckpt.Repository.init(location, **({"max_chain": max_chain} if max_chain else {}))
        self.lossy = lossy
        self.ids: list[str] = []
        self.new_raw_bytes = 0

    def save(self, state: qckpt.TrainingState) -> None:
        snapshot = self.repo.commit(state, branch="explore" if self.lossy else "main", lossy=self.lossy)
        self.ids.append(snapshot.id)
        self.new_raw_bytes += snapshot.stats.new_raw_bytes

    def bytes(self) -> int:
        """At rest: the history and the warm copies."""
        stats = self.repo.stats()
        return stats.stored_bytes + stats.warm_bytes

    def restore(self, index: int, template: Any) -> None:
        with qckpt.Repository.open(self.location, hot_snapshots=0) as fresh:
            touch(fresh.load(self.ids[index]).tree())

    def __getstate__(self) -> dict[str, Any]:  # for a fresh process: everything but the open repository
        return {k: v for k, v in self.__dict__.items() if k != "repo"}

    def warm_bytes(self) -> int:
        return self.repo.stats().warm_bytes

    def bytes_written(self) -> int:
        """History bytes (only ever added to) plus every warm copy written, replaced or not."""
        warm = self.repo._warm  # the writer's own count (internal: no public API needs it)
        return self.repo.stats().stored_bytes + (warm.bytes_written if warm is not None else 0)

    def max_relative_error(self, original: dict[str, torch.Tensor]) -> float:
        """Largest |stored - original| / |original| over the latest snapshot's nonzero
        floats (``original``: ``_tensor_table`` of the state that was saved last)."""
        stored = _tensor_table(self.repo.load(self.ids[-1]).tree())[1]
        worst = 0.0
        for key, value in original.items():
            if value.is_floating_point() and value.numel():
                nonzero = value != 0
                error = (stored[key].double() - value.double())[nonzero].abs() / value.double()[nonzero].abs()
                worst = max(worst, float(error.max()) if error.numel() else 0.0)
        return worst

    def restore_hot(self, state: qckpt.TrainingState) -> float:
        start = time.perf_counter()
        self.repo.restore(state, self.ids[-1])
        return time.perf_counter() - start

    def close(self) -> None:
        self.repo.close()


@dataclass
class Result:
    save_times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)  # process CPU seconds (all threads) per save


def _trainer(size: str, scenario: str, total: int) -> Trainer:
    trainer = Trainer(size, total_steps=total)
    if scenario == "frozen_90":  # fine-tuning: freeze the first 90% of parameters, optimize the rest
        params = list(trainer.model.parameters())
        budget, frozen = 0.9 * sum(p.numel() for p in params), 0
        for p in params:
            if frozen + p.numel() > budget:
                break
            p.requires_grad_(False)
            frozen += p.numel()
        trainable = [p for p in params if p.requires_grad]
        trainer.optimizer = torch.optim.AdamW(trainable, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
        trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, WarmupCosine(max(1, total // 10), total))
        trainer.state = qckpt.TrainingState(
            model=trainer.model, optimizer=trainer.optimizer, scheduler=trainer.scheduler, sampler=trainer.sampler
        )
    return trainer


@contextmanager
def _locations(backend: str, root: Path) -> Iterator[Callable[[str], str]]:
    if backend == "local":
        yield lambda name: str(root / name)
        return
    for key, value in CREDENTIALS.items():
        os.environ.setdefault(key, value)
    with moto_server() as url:
        os.environ["AWS_ENDPOINT_URL"] = url
        bucket = new_bucket(url)
        yield lambda name: f"s3://{bucket}/{name}"


def run_scenario(scenario: str, size: str, commits: int, chains: list[int], backend: str, lossy: int) -> dict[str, Any]:
    interval = 10 if scenario == "every_10" else 1
    steps = commits * interval
    trainer = _trainer(size, scenario, total=steps + 10)
    with tempfile.TemporaryDirectory(prefix="qckpt-bench-storage-") as tmp, _locations(backend, Path(tmp)) as where:
        root = Path(tmp)
        methods: list[Method] = [
            TorchSave("torch.save", root / "torch"), TorchSaveZstd("torch.save+zstd", root / "torchzstd"),
            Safetensors("safetensors", root / "safetensors"), Dcp("dcp", root / "dcp"),
            Qckpt("qckpt-plain", where("plain"), 1), Qckpt("qckpt", where("qckpt"), None),
        ]  # fmt: skip
        methods += [Qckpt(f"qckpt-k{k}", where(f"k{k}"), k) for k in chains]
        if lossy:
            methods.append(Qckpt(f"qckpt-lossy{lossy}", where("lossy"), None, qckpt.LossyTier(lossy)))
        results = {m.name: Result() for m in methods}
        for step in range(1, steps + 1):
            trainer.train_step()
            if step % interval:
                continue
            for method in methods:
                start, cpu = time.perf_counter(), time.process_time()
                method.save(trainer.state)
                results[method.name].save_times.append(time.perf_counter() - start)
                results[method.name].cpu_times.append(time.process_time() - cpu)
        template = trainer.state.capture()  # restores run in another process: dcp's loads in place into its own copy
        last_saved = {key: value.clone() for key, value in _tensor_table(template)[1].items()}
        positions = {"latest": commits - 1, "middle": commits // 2, "oldest": 0}
        out: dict[str, Any] = {}
        for method in methods:
            result = results[method.name]
            times = restore_times(method, list(positions.values()), template)
            entry = {
                "bytes": method.bytes(),
                "bytes_written": method.bytes_written(),
                "save_s": statistics.mean(result.save_times),
                **{f"restore_{name}_s": times[index] for name, index in positions.items()},
            }
            if isinstance(method, Qckpt):
                entry["warm_bytes"] = method.warm_bytes()
                if method.lossy:
                    entry["max_relative_error"] = method.max_relative_error(last_saved)
                    entry["relative_error_bound"] = method.lossy.relative_error
                entry["restore_latest_hot_s"] = min(method.restore_hot(trainer.state) for _ in range(3))
                entry["max_chain"] = method.repo.config.max_chain
                # everything a commit costs (staging, hashing, encoding, writing) per CPU-second: a lower bound on the encoder
                entry["encode_mb_per_cpu_s"] = method.new_raw_bytes / 1e6 / sum(result.cpu_times)
            out[method.name] = entry
            method.close()
    params = sum(p.numel() for p in trainer.model.parameters())
    return {"checkpoints": commits, "steps": steps, "params": params, "methods": out}


def _report(results: dict[str, Any]) -> None:
    for name, scenario in results["scenarios"].items():
        base = scenario["methods"]["torch.save"]
        print(f"\n{name}: {scenario['checkpoints']} checkpoints over {scenario['steps']} steps, {scenario['params']:,} params")
        print(f"  {'method':16s} {'MB stored':>10s} {'bytes/ts':>9s} {'written/ts':>10s} {'save ms':>8s} "
              f"{'latest/ts':>10s} {'middle/ts':>10s} {'oldest/ts':>10s}")  # fmt: skip
        for method, m in scenario["methods"].items():
            ratios = " ".join(f"{m[f'restore_{p}_s'] / base[f'restore_{p}_s']:10.2f}" for p in ("latest", "middle", "oldest"))
            print(f"  {method:16s} {m['bytes'] / 1e6:10.1f} {m['bytes'] / base['bytes']:9.3f} "
                  f"{m['bytes_written'] / base['bytes']:10.3f} {m['save_s'] * 1e3:8.1f} {ratios}")  # fmt: skip
        print("  restores from storage in a fresh process (ms): "
              + ", ".join(f"{p} {base[f'restore_{p}_s'] * 1e3:.0f}" for p in ("latest", "middle", "oldest")) + " for torch.save; "
              + ", ".join(f"{p} {scenario['methods']['qckpt'][f'restore_{p}_s'] * 1e3:.0f}" for p in ("latest", "middle", "oldest"))
              + " for qckpt")  # fmt: skip
        q = scenario["methods"]["qckpt"]
        print(f"  qckpt: warm copies at rest {q['warm_bytes'] / base['bytes']:.3f} of torch.save's bytes; "
              f"restore of the latest from the hot tier {q['restore_latest_hot_s'] * 1e3:.1f} ms; "
              f"commit throughput {q['encode_mb_per_cpu_s']:.0f} MB per CPU-second")  # fmt: skip
        for method, m in scenario["methods"].items():
            if "max_relative_error" in m:
                print(f"  {method}: largest relative error {m['max_relative_error']:.3g} (bound {m['relative_error_bound']:.3g})")


def run(args: argparse.Namespace) -> None:
    size = args.size or ("3m" if args.quick else "10m")
    commits = args.commits or (12 if args.quick else 60)
    chains = [int(k) for k in args.chains.split(",") if k.strip()]
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    results: dict[str, Any] = {"size": size, "backend": args.backend, "cores": os.cpu_count(), "scenarios": {}}
    for scenario in SCENARIOS:
        start = time.perf_counter()
        results["scenarios"][scenario] = run_scenario(
            scenario, size, commits, chains if scenario == "every_step" else [], args.backend, args.lossy
        )
        print(f"[{scenario}: {time.perf_counter() - start:.0f} s]", flush=True)
    _report(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
        print(f"\nwrote {args.json}")
