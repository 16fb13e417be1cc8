"""``python -m bench spike``: recovering from training instability, five ways, on identical runs.

The reference byte-level transformer (``tiny``) trains with AdamW and warm-up +
cosine LR on the standard library's sources. Scenarios (each on several seeds):

* ``clean``: nothing injected;
* ``lr_spike``: the learning rate is multiplied by 30 for 6 steps at 40% of
  the run (a too-high peak: a schedule or config mistake);
* ``poison``: 8 consecutive batches at 40% of the data stream are long runs of
  one repeated byte (corrupt or degenerate data), tied to the data position;
* ``noise_shard``: 16 consecutive batches at 40% of the data stream are
  uniformly random bytes (a binary or encrypted shard mixed into the text).
  Added after the light cone's defaults were settled, and never used to
  choose them: a scenario the engine had not seen.

Methods, each on the same seeds and data: ``none`` (global-norm clipping at
1.0, as most recipes do); ``zclip`` (ZClip: clip at EMA mean + 2.5 std of the
gradient norm, alpha 0.97); ``skip_step`` (skip the update when the loss or
the gradient norm is 6 EMA standard deviations above its mean, OLMo-core's
rule); ``rollback_skip`` (the manual recipe, automated: on the light cone's
trigger roll back and skip the batches since the rollback point, no
exploration); ``lightcone`` (the engine with its defaults).

Reported per scenario and method: final held-out loss (a test set the methods
never see; the light cone selects on a separate validation set) as mean and
standard deviation over seeds, loss spikes on the realized path (onsets of a
loss 30% above the median of the previous 50 steps), compute steps (every
forward+backward step, rollouts included, plus each held-out evaluation batch
at ``EVAL_COST`` = 1/3 of a step: a forward pass costs about 2N FLOPs a token
against 6N for forward and backward; the ratio measured on this machine is
reported as ``eval_cost_measured``, and the raw ``train_steps`` and
``eval_batches`` next to it), and wall seconds. The JSON shape is the issue's;
the light-cone report of one ``lightcone`` run is written next to it
(``<stem>-cone.html``, ``<stem>-cone.png``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import qckpt
from bench.workload import SIZES, CharGPT, ModelSize, WarmupCosine, load_corpus
from branch import ConeConfig, ConeRecord, Controls, LightCone, StepResult, write_report
from branch.ray_rollouts import RunParts

SIZE = SIZES["tiny"]
SCENARIOS = ("clean", "lr_spike", "poison", "noise_shard")
EVAL_COST = 1 / 3  # an evaluation batch (forward only) in training steps (forward + backward)
METHODS = ("none", "zclip", "skip_step", "rollback_skip", "lightcone")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="fewer steps and seeds")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here (and the cone report beside it)")


class Batches:
    """Random windows of the training part of the corpus, drawn by a seeded generator;
    ``poison`` is a range of draw numbers whose batches are runs of one repeated byte
    (``noise`` False) or uniformly random bytes (``noise`` True).
    An iterator with ``state_dict``, ``skip`` and ``reseed``: a qckpt component."""

    def __init__(self, data: torch.Tensor, seed: int, poison: range = range(0), noise: bool = False,
                 size: ModelSize = SIZE) -> None:  # fmt: skip
        self.data, self.poison, self.noise, self.size = data, poison, noise, size
        self.generator = torch.Generator().manual_seed(seed)
        self.drawn = 0

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        block = self.size.block_size
        starts = torch.randint(len(self.data) - block - 1, (self.size.batch_size,), generator=self.generator)
        window = torch.stack([self.data[s : s + block + 1] for s in starts.tolist()]).long()
        if self.drawn in self.poison and self.noise:
            window = torch.randint(256, window.shape, generator=self.generator)  # random bytes
        elif self.drawn in self.poison:
            window = window[:, :1].expand(-1, block + 1).clone()  # one byte, repeated
        self.drawn += 1
        return window[:, :-1], window[:, 1:]

    def skip(self, n: int) -> None:
        for _ in range(n):
            next(self)

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "drawn": self.drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.drawn = int(state["drawn"])


class SpikedSchedule(WarmupCosine):
    """Warm-up + cosine, multiplied by ``factor`` on steps in ``spike`` (plain numbers
    only, so ``LambdaLR.state_dict`` stores it)."""

    def __init__(self, total: int, spike: range, factor: float) -> None:
        super().__init__(max(1, total // 10), total)
        self.spike_start, self.spike_stop, self.factor = spike.start, spike.stop, factor

    def __call__(self, step: int) -> float:
        return super().__call__(step) * (self.factor if self.spike_start <= step < self.spike_stop else 1.0)


def _held_out(data: torch.Tensor, n: int, offset: int, size: ModelSize) -> list[tuple[torch.Tensor, torch.Tensor]]:
    stride = size.block_size + 1
    out = []
    for i in range(n):
        w = data[offset + i * stride * size.batch_size : offset + (i + 1) * stride * size.batch_size]
        w = w.view(size.batch_size, stride).long()
        out.append((w[:, :-1], w[:, 1:]))
    return out


@dataclass
class Run:
    """One training run's live objects."""

    state: qckpt.TrainingState
    model: CharGPT
    optimizer: torch.optim.Optimizer
    scheduler: Any
    batches: Batches


class Workload:
    """The spike benchmark's runs: ``size`` of the model (``tiny`` here), LR spike
    ``spike_factor``, the model on ``device`` (batches are drawn on the CPU and
    moved there by the step functions)."""

    def __init__(self, steps: int, spike_factor: float = 30.0, size: ModelSize = SIZE, device: str = "cpu") -> None:
        self.spike_factor, self.size, self.device = spike_factor, size, torch.device(device)
        corpus = load_corpus(1 << 20)
        cut = int(len(corpus) * 0.9)
        self.train_data, held = corpus[:cut], corpus[cut:]
        self.validation = _held_out(held, 8, 0, size)  # the light cone selects on these
        self.test = _held_out(held, 16, len(held) // 2, size)  # every method is scored on these
        self.steps = steps

    def new_run(self, scenario: str, seed: int) -> Run:
        torch.manual_seed(seed)
        model = CharGPT(self.size, dropout=0.0).to(self.device)  # initialised on the CPU: the same weights anywhere
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
        at = int(self.steps * 0.4)
        spike = range(at, at + 6) if scenario == "lr_spike" else range(0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, SpikedSchedule(self.steps, spike, self.spike_factor))
        poison = {"poison": range(at, at + 8), "noise_shard": range(at, at + 16)}.get(scenario, range(0))
        batches = Batches(self.train_data, seed + 1000, poison, noise=scenario == "noise_shard", size=self.size)
        state = qckpt.TrainingState(model=model, optimizer=optimizer, scheduler=scheduler, data=batches)
        return Run(state, model, optimizer, scheduler, batches)

    @staticmethod
    def losses(model: CharGPT, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
        model.eval()
        with torch.no_grad():
            out = [float(model(*_on(model, (x, y)))) for x, y in batches]
        model.train()
        return out


def _on(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """``batch`` on ``model``'s device."""
    device = next(model.parameters()).device
    return tuple(t.to(device) for t in batch)


class _Ema:
    """Mean and variance EMAs of a signal, fed only ordinary values (as ZClip does)."""

    def __init__(self, alpha: float = 0.97, warmup: int = 25) -> None:
        self.alpha, self.warmup, self.mean, self.var, self.n = alpha, warmup, 0.0, 0.0, 0

    def z(self, x: float) -> float:
        if self.n < self.warmup:
            return 0.0
        return (x - self.mean) / math.sqrt(max(self.var, 1e-24))

    def update(self, x: float) -> None:
        self.n += 1
        if self.n <= self.warmup:
            delta = x - self.mean
            self.mean += delta / self.n
            self.var += (delta * (x - self.mean) - self.var) / self.n
        else:
            self.mean = self.alpha * self.mean + (1 - self.alpha) * x
            self.var = self.alpha * self.var + (1 - self.alpha) * (x - self.mean) ** 2


def _step(run: Run, batch: Any, clip: float | None) -> tuple[torch.Tensor, float]:
    """Forward and backward; returns the loss and the gradient norm (clipped at ``clip`` if given)."""
    x, y = _on(run.model, batch)
    loss = run.model(x, y)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in run.model.parameters() if p.grad is not None]
    norm = float(torch.nn.utils.clip_grad_norm_(params, clip if clip is not None else float("inf")))
    return loss, norm


def train_plain(run: Run, steps: int, method: str) -> list[list[Any]]:
    """``none``, ``zclip`` and ``skip_step``: one loop, three update rules."""
    path: list[list[Any]] = []
    grad_ema, loss_ema = _Ema(), _Ema()
    while run.state.step < steps:
        batch = next(run.batches)
        clip = 1.0 if method == "none" else None
        loss, norm = _step(run, batch, clip)
        value = loss.item()
        skip = False
        if method == "zclip":
            z = grad_ema.z(norm)
            if z > 2.5:  # clip to the EMA mean + 2.5 std, as ZClip does
                limit = grad_ema.mean + 2.5 * math.sqrt(max(grad_ema.var, 1e-24))
                torch.nn.utils.clip_grad_norm_(run.model.parameters(), limit)
            else:
                grad_ema.update(norm)
        elif method == "skip_step":
            skip = not math.isfinite(value) or grad_ema.z(norm) > 6 or loss_ema.z(value) > 6
            if not skip:
                grad_ema.update(norm)
                loss_ema.update(value)
        if not skip and math.isfinite(norm):
            run.optimizer.step()
        run.scheduler.step()
        run.state.step += 1
        path.append([run.state.step, value, norm])
    return path


def cone_step(state: qckpt.TrainingState, batch: Any, controls: Controls) -> StepResult:
    """The light cone's step function for a ``Workload`` state: clipping through ``controls``
    (global norm 1.0 as in ``none`` unless an intervention set another limit)."""
    model, optimizer, scheduler = (state.components[k] for k in ("model", "optimizer", "scheduler"))
    x, y = _on(model, batch)
    loss = model(x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    limit = controls.clip_grad_norm if controls.clip_grad_norm is not None else 1.0
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), limit))
    if math.isfinite(norm):
        optimizer.step()
    scheduler.step()
    return StepResult(loss.item(), norm)


def worker_run(steps: int, scenario: str, seed: int, size: str = "tiny", evaluate: bool = True) -> RunParts:
    """A fresh run of ``scenario`` for a rollout worker (``RayRollouts(functools.partial(worker_run, ...))``):
    the same state, step, batches and validation evaluation (if ``evaluate``) as ``train_cone``'s."""
    workload = Workload(steps, size=SIZES[size])
    run_ = workload.new_run(scenario, seed)
    losses = (lambda s: workload.losses(s.components["model"], workload.validation)) if evaluate else None
    return RunParts(run_.state, cone_step, run_.batches, losses)


def warm_cone(repo: qckpt.Repository, workload: Workload, config: ConeConfig, *, executor: Any = None,
              validation: int | None = None, warm: int = 12) -> LightCone:  # fmt: skip
    """A ``LightCone`` on a fresh clean run (seed 0), committed, trained and observed
    for ``warm`` steps and committed there: the starting point of rollout tests
    and benchmarks. ``validation``: how many of the workload's validation
    batches it evaluates futures on (None: no evaluation)."""
    run_ = workload.new_run("clean", 0)
    evaluate = None
    if validation is not None:
        batches = workload.validation[:validation]
        evaluate = lambda s: workload.losses(s.components["model"], batches)  # noqa: E731
    cone = LightCone(repo, run_.state, cone_step, run_.batches, evaluate, config=config, executor=executor)
    cone.commit()
    for _ in range(warm):
        cone.observe(cone.train_step(next(cone.batches)))
    cone.commit()
    return cone


def train_cone(run: Run, steps: int, workload: Workload, repo: qckpt.Repository, explore: bool, name: str) -> tuple[list[list[Any]], dict[str, int]]:
    """``lightcone`` (explore) or ``rollback_skip`` (one future: skip, no control, no
    choice); returns the realized path and the compute counts (``ConeRecord.compute``)."""
    def evaluate(state: qckpt.TrainingState) -> list[float]:
        return workload.losses(state.components["model"], workload.validation)

    horizon = max(10, steps // 10)
    config = ConeConfig(horizon=horizon, commit_every=5)
    cone = LightCone(repo, run.state, cone_step, run.batches, evaluate, run=name, config=config)
    if not explore:
        return _rollback_skip(cone, steps), cone.record.compute
    record = cone.run(steps)
    return record.main, record.compute


def _rollback_skip(cone: LightCone, steps: int) -> list[list[Any]]:
    """The manual recipe with the light cone's trigger: roll back, skip, carry on."""
    cone.index.total_steps = steps
    cone.commit()
    path: list[list[Any]] = []
    while cone.state.step < steps:
        result = cone.train_step(next(cone.batches))
        path.append([cone.state.step, result.loss, result.grad_norm])
        trigger = cone.observe(result)
        if trigger is not None:
            origin = cone.origin_for(trigger)
            cone.roll_back(origin)
            cone.batches.skip(max(1, trigger.step - (origin.step or 0)))
            path = [p for p in path if p[0] <= (origin.step or 0)]
    return path


def count_spikes(path: list[list[Any]]) -> int:
    """Onsets of a loss 30% above the median of the previous 50 steps (or non-finite)."""
    recent: deque[float] = deque(maxlen=50)
    spikes, inside = 0, False
    for _, loss, _ in path:
        spiking = not math.isfinite(loss) or (len(recent) >= 20 and loss > 1.3 * statistics.median(recent))
        spikes += spiking and not inside
        inside = spiking
        if math.isfinite(loss) and not spiking:
            recent.append(loss)
    return spikes


def measure_eval_cost(workload: Workload, repeats: int = 3) -> float:
    """Wall time of one evaluation batch over one training step, on a fresh run (best of ``repeats``)."""
    run_ = workload.new_run("clean", 0)
    n = len(workload.validation)
    train, evaluate = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(n):
            cone_step(run_.state, next(run_.batches), Controls())
        train.append(time.perf_counter() - started)
        started = time.perf_counter()
        Workload.losses(run_.model, workload.validation)
        evaluate.append(time.perf_counter() - started)
    return min(evaluate) / min(train)


def run(args: argparse.Namespace) -> dict[str, Any]:
    steps, seeds = (120, 2) if args.quick else (args.steps, args.seeds)
    workload = Workload(steps)
    results: dict[str, Any] = {"steps": steps, "seeds": seeds, "model": "tiny", "eval_cost": EVAL_COST,
                               "eval_cost_measured": measure_eval_cost(workload), "scenarios": {}}  # fmt: skip
    print(f"an evaluation batch costs {results['eval_cost_measured']:.2f} of a training step here "
          f"(counted as {EVAL_COST:.2f})", flush=True)
    cone_report: tuple[Path, Path] | None = None
    report_has_events = False
    with tempfile.TemporaryDirectory(prefix="qckpt-spike-") as tmp:
        for scenario in SCENARIOS:
            methods: dict[str, Any] = {}
            for method in METHODS:
                finals, spikes, walls = [], [], []
                counts: list[dict[str, int]] = []
                for seed in range(seeds):
                    run_ = workload.new_run(scenario, seed)
                    started = time.perf_counter()
                    if method in ("lightcone", "rollback_skip"):
                        repo_path = Path(tmp) / f"{scenario}-{method}-{seed}"
                        with qckpt.Repository.init(repo_path) as repo:
                            path, count = train_cone(run_, steps, workload, repo, method == "lightcone", "main")
                            if method == "lightcone" and scenario != "clean" and not report_has_events and args.json:
                                stem = args.json.with_suffix("")  # the first injected run with an event, else the first
                                cone_report = write_report(repo, "main", stem.with_name(stem.name + "-cone"))
                                report_has_events = bool(ConeRecord.load(repo, "main").events)
                    else:
                        path = train_plain(run_, steps, method)
                        count = {"train_steps": steps, "eval_batches": 0}
                    walls.append(time.perf_counter() - started)
                    test = Workload.losses(run_.model, workload.test)
                    finals.append(statistics.fmean(test))
                    spikes.append(count_spikes(path))
                    counts.append(dict(count))
                methods[method] = {
                    "final_loss_mean": statistics.fmean(finals),
                    "final_loss_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                    "final_losses": finals, "spikes": statistics.fmean(spikes),
                    "compute_steps": statistics.fmean(c["train_steps"] + EVAL_COST * c["eval_batches"] for c in counts),
                    "train_steps": statistics.fmean(c["train_steps"] for c in counts),
                    "eval_batches": statistics.fmean(c["eval_batches"] for c in counts), "wall_s": statistics.fmean(walls),
                }  # fmt: skip
                m = methods[method]
                print(f"{scenario:9s} {method:14s} final loss {m['final_loss_mean']:.4f} +- {m['final_loss_std']:.4f}  "
                      f"spikes {m['spikes']:.1f}  compute {m['compute_steps']:.0f} ({m['compute_steps'] / steps:.2f}x)  "
                      f"wall {m['wall_s']:.1f}s", flush=True)  # fmt: skip
            results["scenarios"][scenario] = {"methods": methods}
    if cone_report:
        results["cone_report"] = [str(p) for p in cone_report]
        print(f"light-cone report: {cone_report[0]} and {cone_report[1]}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return results
