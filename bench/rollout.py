"""``python -m bench rollout``: K futures of the reference model for H steps, each
rollout strategy that can run here, side by side on the same futures.

Strategies: ``sequential`` (one future after another), ``batched`` (the K
copies stacked in one forward and backward) and, when the ``ray`` package is
installed, ``ray`` (each future a task on a local Ray instance started here,
loopback only, as many CPUs as this machine; its entries add
``overhead_s_per_job``: the extra wall seconds per future against
sequential), and ``devices`` (batched groups spread over every CUDA device)
where there are two or more. ``--device cuda`` trains the live run, and so
the sequential and batched strategies, on a GPU; Ray tasks build CPU runs,
so ``ray`` is measured only with ``--device cpu``. Each strategy runs the same K futures (a control and
learning-rate variants, half of them also skipping batches) from one origin
snapshot, end to end through the executor: restore, intervene, train H
steps, commit each future at the horizon (no held-out evaluation, so the
figures are training throughput). Reported per strategy and K:
``steps_per_s`` (future-steps per second, K*H over the wall time),
``peak_mem_bytes`` (on a GPU, the CUDA peak allocation during the rollouts
above the memory allocated when they started, such as the live run's; null
on the CPU, where no per-strategy peak is measured), ``max_abs_diff_vs_sequential``
(largest parameter difference at the horizon, over every future and tensor),
``max_rel_diff_vs_sequential`` (largest over the futures of ``‖a − b‖ / ‖a‖``
over all of a future's parameters); ``sequential`` entries add
``kernel_swap_abs_diff`` and ``kernel_swap_rel_diff``: the same differences
between the sequential futures and the same futures trained again with
attention on SDPA's math kernel, the floor a change of kernels alone (a
floating-point reassociation, nothing else) reaches at this horizon: a
batched difference of that order is reassociation, one far above it a bug;
``chosen``: the scheduler's pick per K from its probe. ``batched`` entries add
``optimizer_stacked_s`` and ``optimizer_per_copy_s``: one AdamW update of the K
stacked copies (``branch.stacked_adamw``) against stepping the K copies'
optimizers one by one, on the same stacks (medians of alternating rounds,
synchronised on a GPU). ``sequential`` and ``batched`` entries add
``train_steps_per_s``: future-steps per second of the training step alone
(no restore, intervention or commit): one run's step against one step of K
stacked copies of it, medians of ``TRAIN_ROUNDS`` alternating rounds after a
warm-up (what the scheduler's probe compares, timed longer).

``pruning`` (null with ``--seeds 0``): the light cone's events in the spike benchmark's injected
scenarios (``bench.spike``, its seeds, full rollouts), each replayed through
``branch.pruning`` as a run with ``ConeConfig(pruning=Pruning())`` would cut
it (a future's first rung steps are the same either way, so its prefix is the
recorded one): ``compute_saved`` (share of rollout compute, training steps
plus evaluation batches at ``EVAL_COST``, the cut futures would not have
spent), ``same_winner_rate`` (events where the futures that go on yield the
full rollouts' winner), ``forecast_mae`` (mean absolute error of the rung
forecast against the mean training loss of each future's last steps), and
``events``; ``ranked_by`` names the default ranking (``observed``) and
``ranked_by_forecast`` holds the same figures with the futures ranked by
their forecasts instead (``Pruning(rank_by="forecast")``), on the same events;
``successive_halving`` holds them for successive halving as published, ranked
by the observed loss with eta = 2 (``HALVING_RUNGS``: the four alternatives to a
quarter of the horizon, the better two to half, the best one to the end), and
``ranked_by_held_out`` for the default rule ranked as ASHA ranks, by the loss
on the light cone's validation batches at the rung (each future's commit at
the rung step, restored and evaluated; the evaluations count as compute;
events whose rung step has no commit are left out): rules ``Pruning`` does
not offer, measured, not adopted (README).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import qckpt
from bench.spike import EVAL_COST, Workload, cone_step, train_cone, warm_cone, worker_run
from bench.workload import SIZES
from branch import (
    BatchedRollouts,
    BatchedStep,
    Combined,
    ConeConfig,
    ConeRecord,
    Future,
    LightCone,
    Pruning,
    RolloutScheduler,
    ScaleLR,
    SequentialRollouts,
    SkipBatches,
    select,
)
from branch.interventions import Controls
from branch.pruning import RANKINGS, actual, survivors
from branch.ray_rollouts import RayRollouts
from branch.rollouts import _Stack, _timed_pair


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="K in {2, 4}, 5 steps; pruning over one seed of 200-step spike runs")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--horizon", type=int, default=20)
    parser.add_argument("--device", default="cpu", help="where the live run trains: cpu, cuda, cuda:1 ...")
    parser.add_argument("--seeds", type=int, default=3,
                        help="spike-benchmark seeds replayed for the pruning figures (0: skip them; they train on the CPU)")
    parser.add_argument("--json", type=Path, help="also write the results here")


def futures(k: int) -> list[Future]:
    """A control and ``k - 1`` distinct interventions."""
    out = [Future("control", None)]
    for i in range(1, k):
        lower = ScaleLR(1.0 - 0.5 * i / k)
        out.append(Future(f"f{i}", Combined((SkipBatches(i), lower)) if i % 2 else lower))
    return out


def _cone(repo: qckpt.Repository, workload: Workload, executor: Any) -> LightCone:
    return warm_cone(repo, workload, ConeConfig(horizon=10, commit_every=10**6), executor=executor, warm=5)


def _start_ray() -> Any:
    """A local Ray instance (loopback only), or None without the ray package."""
    try:
        import ray
    except ImportError:
        return None
    root = str(Path(__file__).resolve().parents[1])
    ray.init(address="local", include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": root}})  # fmt: skip
    return ray


def measure(workload: Workload, k: int, horizon: int, executor: Any, size: str,
            instrument: Callable[[qckpt.Repository], None] | None = None) -> tuple[float, int | None, list[dict[str, Any]]]:  # fmt: skip
    """(future-steps per second, CUDA peak bytes beyond the start or None, each future's model at the horizon);
    ``executor`` "ray" builds a ``RayRollouts`` on the run's repository; ``instrument`` is
    called with the repository just before the rollouts start (to wrap what it times)."""
    with tempfile.TemporaryDirectory(prefix="qckpt-rollout-") as tmp, qckpt.Repository.init(Path(tmp) / "r") as repo:
        if executor == "ray":
            executor = RayRollouts(functools.partial(worker_run, 1000, "clean", 0, size, False), Path(tmp) / "r")
        cone = _cone(repo, workload, executor)
        origin = repo.snapshot("main")
        if instrument is not None:
            instrument(repo)
        before = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        rollouts = cone.run_futures(origin, futures(k), horizon)
        wall = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated() - before if torch.cuda.is_available() else None
        models = [repo.load(r.snapshot).tree()["components"]["model"] for r in rollouts.results]
    return k * horizon / wall, peak, models


def run(args: argparse.Namespace) -> dict[str, Any]:
    ks, horizon = ((2, 4), 5) if args.quick else ((4, 8, 16), args.horizon)
    device = getattr(args, "device", "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: this machine has no CUDA device")
    workload = Workload(1000, size=SIZES[args.size], device=device)
    strategies: dict[str, dict[int, Any]] = {"sequential": {}, "batched": {}}
    chosen: dict[int, str] = {}
    references, walls = {}, {}
    step = BatchedStep(clip_grad_norm=1.0)

    def entry(name: str, k: int, executor: Any) -> dict[str, Any]:
        started = time.perf_counter()
        speed, peak, models = measure(workload, k, horizon, executor, args.size)
        walls[name, k] = time.perf_counter() - started
        references.setdefault(k, models)  # sequential runs first
        diff, relative = differences(references[k], models)
        strategies[name][k] = {"steps_per_s": speed, "peak_mem_bytes": peak, "max_abs_diff_vs_sequential": diff,
                               "max_rel_diff_vs_sequential": relative}  # fmt: skip
        if name == "sequential":  # the same futures, attention on SDPA's math kernel: what a kernel swap alone moves
            with sdpa_kernel([SDPBackend.MATH]):
                swapped = measure(workload, k, horizon, SequentialRollouts(), args.size)[2]
            strategies[name][k]["kernel_swap_abs_diff"], strategies[name][k]["kernel_swap_rel_diff"] = differences(models, swapped)
        return strategies[name][k]

    gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    for k in ks:
        seq, bat = entry("sequential", k, SequentialRollouts()), entry("batched", k, BatchedRollouts(step))
        bat["optimizer_stacked_s"], bat["optimizer_per_copy_s"] = optimizer_times(workload, k, step)
        seq["train_steps_per_s"], bat["train_steps_per_s"] = training_only(workload, k, step)
        if len(gpus) > 1:
            strategies.setdefault("devices", {})
            entry("devices", k, BatchedRollouts(step, devices=gpus))
        with tempfile.TemporaryDirectory(prefix="qckpt-rollout-") as tmp, qckpt.Repository.init(Path(tmp) / "r") as repo:
            scheduler = RolloutScheduler(step)
            chosen[k], why = scheduler.choose(_cone(repo, workload, scheduler), k)
        print(f"K={k:2d} H={horizon}: sequential {seq['steps_per_s']:.1f} steps/s, batched {bat['steps_per_s']:.1f} steps/s "
              f"({bat['steps_per_s'] / seq['steps_per_s']:.2f}x; training alone {seq['train_steps_per_s']:.1f} vs "
              f"{bat['train_steps_per_s']:.1f}, {bat['train_steps_per_s'] / seq['train_steps_per_s']:.2f}x), max |diff| {bat['max_abs_diff_vs_sequential']:.2e} (relative {bat['max_rel_diff_vs_sequential']:.1e}, a kernel swap alone {seq['kernel_swap_rel_diff']:.1e}); "
              f"chosen {chosen[k]} ({why}); AdamW update of the {k} copies: stacked {bat['optimizer_stacked_s'] * 1e3:.1f} ms, "
              f"one by one {bat['optimizer_per_copy_s'] * 1e3:.1f} ms", flush=True)  # fmt: skip
    ray = _start_ray() if workload.device.type == "cpu" else None  # Ray workers build CPU runs
    if ray is not None:  # after the others: an idle Ray instance still takes some CPU
        strategies["ray"] = {}
        for k in ks:
            m = entry("ray", k, "ray")
            m["overhead_s_per_job"] = (walls["ray", k] - walls["sequential", k]) / k
            print(f"K={k:2d} H={horizon}: ray {m['steps_per_s']:.1f} steps/s, max |diff| {m['max_abs_diff_vs_sequential']:.2e}, "
                  f"{m['overhead_s_per_job']:.2f} s more per job than sequential", flush=True)  # fmt: skip
        ray.shutdown()
    pruning = pruning_figures(200 if args.quick else 300, 1 if args.quick else args.seeds) if args.seeds else None
    if pruning is None:
        print("pruning figures skipped (--seeds 0)")
    else:
        forecast_ranked = pruning["ranked_by_forecast"]
        print(f"pruning over {pruning['events']} spike-benchmark events, ranked by the loss observed at the rung: saves "
              f"{pruning['compute_saved']:.0%} of rollout compute, same winner in {pruning['same_winner_rate']:.0%}; "
              f"ranked by forecast: saves {forecast_ranked['compute_saved']:.0%}, same winner in "
              f"{forecast_ranked['same_winner_rate']:.0%} (forecast MAE {pruning['forecast_mae']:.3f}); successive halving "
              f"at {' and '.join(f'{r:g}' for r in HALVING_RUNGS)} of the horizon: saves "
              f"{pruning['successive_halving']['compute_saved']:.0%}, same winner in "
              f"{pruning['successive_halving']['same_winner_rate']:.0%}; ranked by the held-out loss at the rung: saves "
              f"{pruning['ranked_by_held_out']['compute_saved']:.0%}, same winner in "
              f"{pruning['ranked_by_held_out']['same_winner_rate']:.0%} of {pruning['ranked_by_held_out']['events']}")
    results = {"model": args.size, "horizon": horizon, "device": str(workload.device),
               "strategies": strategies, "chosen": chosen, "pruning": pruning}  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return results


#: Alternating rounds of the training-only comparison (``train_steps_per_s``).
TRAIN_ROUNDS = 15


def training_only(workload: Workload, k: int, step: BatchedStep, rounds: int = TRAIN_ROUNDS) -> tuple[float, float]:
    """(sequential, batched) future-steps per second of the training step alone: a
    run's own step (``cone_step``, the sequential strategy's) against a step of
    ``k`` stacked copies of it, medians of ``rounds`` alternating rounds after
    one warm-up each (both end in a host synchronisation: the losses read)."""
    run_ = workload.new_run("clean", 0)
    single, copies = run_.state.fork()[0], run_.state.fork(k)
    stack = _Stack(step, copies)

    def sequential() -> None:
        cone_step(single, next(single.components["data"]), Controls.of(single))

    def batched() -> None:
        stack.step([c.components["data"] for c in copies], list(range(k)))

    sequential(), batched()
    one, stacked = _timed_pair(rounds, sequential, batched)
    stack.release()
    return 1 / one, k / stacked


def optimizer_times(workload: Workload, k: int, step: BatchedStep, rounds: int = 9) -> tuple[float, float]:
    """(stacked, one by one): median seconds of one AdamW update of ``k`` stacked copies
    of a trained run, alternating the two on the same stacks and gradients."""
    run_ = workload.new_run("clean", 0)
    for _ in range(2):
        cone_step(run_.state, next(run_.batches), Controls())
    stack = _Stack(step, run_.state.fork(k))
    stack.step([iter(run_.batches)] * k, list(range(k)))  # builds the stacked optimizer, once every copy has state
    assert stack.optimizer is not None, "the copies' optimizers are not stackable AdamWs"
    stack._hand_out_grads(list(range(k)))
    sync = torch.cuda.synchronize if workload.device.type == "cuda" else (lambda: None)

    def one_by_one() -> None:
        for copy in stack.copies:
            copy.components["optimizer"].step()

    times: dict[str, list[float]] = {"stacked": [], "apart": []}
    for _ in range(rounds):
        for name, update in (("stacked", stack.optimizer.step), ("apart", one_by_one)):
            sync()
            started = time.perf_counter()
            update()
            sync()
            times[name].append(time.perf_counter() - started)
    stack.release()
    return statistics.median(times["stacked"]), statistics.median(times["apart"])


def differences(reference: list[dict[str, Any]], models: list[dict[str, Any]]) -> tuple[float, float]:
    """(largest absolute parameter difference, largest relative one ``‖a − b‖ / ‖a‖``)
    over the futures of two runs."""
    biggest = max(float((a[n] - b[n]).abs().max()) for a, b in zip(reference, models) for n in a)
    relative = max(math.sqrt(sum(float((a[n].double() - b[n].double()).square().sum()) for n in a)
                             / sum(float(a[n].double().square().sum()) for n in a))
                   for a, b in zip(reference, models))  # fmt: skip
    return biggest, relative


#: Successive halving as published, over a light-cone event's 4 alternatives with
#: eta = 2: all train to a quarter of the horizon, the better half to half of it,
#: the best one to the end (the control always runs to the end).
HALVING_RUNGS = (0.25, 0.5)


def pruning_figures(steps: int, seeds: int, rule: Pruning | None = None) -> dict[str, Any]:
    """Replay every light-cone event of the spike benchmark's injected scenarios
    through the pruning rule (default ``Pruning()``), through the same rule
    with the other ranking, and through successive halving at ``HALVING_RUNGS``
    with the rule's ranking (see the module docstring)."""
    rule = rule or Pruning()
    other = dataclasses.replace(rule, rank_by=next(r for r in RANKINGS if r != rule.rank_by))
    workload = Workload(steps)
    tallies = {rule.rank_by: _Tally(), other.rank_by: _Tally(), "halving": _Tally(), "held_out": _Tally()}
    errors: list[float] = []
    for scenario in ("lr_spike", "poison", "noise_shard"):
        for seed in range(seeds):
            with tempfile.TemporaryDirectory(prefix="qckpt-prune-") as tmp, qckpt.Repository.init(Path(tmp) / "r") as repo:
                train_cone(workload.new_run(scenario, seed), steps, workload, repo, True, "main")
                record = ConeRecord.load(repo, "main")
                probe = workload.new_run(scenario, seed)
                held_out = {event["number"]: _held_out_at(repo, workload, probe, event, rule.rung_steps(event["horizon"]))
                            for event in record.events}  # fmt: skip
            history: list[dict[str, Any]] = []
            for event in record.events:
                rung = rule.rung_steps(event["horizon"])  # the same for all rankings
                if not rung:
                    continue  # too short a horizon to prune
                if held_out[event["number"]] is not None:
                    kept = survivors(held_out[event["number"]], "control", rule.keep)
                    evaluated = sum(f["name"] != "control" for f in event["futures"]) * len(event["futures"][0]["eval"])
                    tallies["held_out"].add(event, {n: rung for n in held_out[event["number"]] if n not in kept}, evaluated)
                for each in (rule, other):
                    cut, forecasts = _replay(event, record.main, each, [rung], history)  # forecasts: the same for both
                    tallies[each.rank_by].add(event, cut)
                rungs = [dataclasses.replace(rule, rung=r).rung_steps(event["horizon"]) for r in HALVING_RUNGS]
                if all(rungs):
                    tallies["halving"].add(event, _replay(event, record.main, rule, rungs, history)[0])
                actuals = {future["name"]: actual(future["metrics"]) for future in event["futures"]}
                errors += [abs(forecasts[n]["value"] - actuals[n]) for n in forecasts if forecasts[n] and actuals[n] is not None]
                history.append({"futures": [{"rung_forecast": forecasts[n], "rung_actual": actuals[n]} for n in forecasts]})
    return {**tallies[rule.rank_by].figures(), "forecast_mae": sum(errors) / len(errors) if errors else None,
            "ranked_by": rule.rank_by, f"ranked_by_{other.rank_by}": tallies[other.rank_by].figures(),
            "successive_halving": {**tallies["halving"].figures(), "rungs": list(HALVING_RUNGS)},
            "ranked_by_held_out": tallies["held_out"].figures()}  # fmt: skip


def _held_out_at(repo: qckpt.Repository, workload: Workload, probe: Any, event: dict[str, Any],
                 rung: int) -> dict[str, float | None] | None:  # fmt: skip
    """Each future's mean loss on the validation batches at ``rung`` steps after the
    event's origin (restored into ``probe``, a run of the same scenario; None for a
    future that diverged by then), or None if a future has no commit at that step."""
    if not rung:
        return None
    step, scores = (event["origin"]["step"] or 0) + rung, {}
    for future in event["futures"]:
        loss = future["metrics"][rung - 1][1] if len(future["metrics"]) >= rung else None
        if loss is None or not math.isfinite(loss):
            scores[future["name"]] = None
            continue
        try:
            snapshot = repo.restore(probe.state, f"{future['branch']}@{step}")
        except qckpt.RevisionNotFoundError:
            return None
        if snapshot.step != step:
            return None
        losses = workload.losses(probe.model, workload.validation)
        scores[future["name"]] = statistics.fmean(losses) if all(map(math.isfinite, losses)) else None
    return scores


@dataclasses.dataclass
class _Tally:
    """Pruning's figures over replayed events: rollout compute spent by full
    rollouts and saved by the cut, events, and events with the same winner."""

    spent: float = 0.0
    saved: float = 0.0
    events: int = 0
    same: int = 0

    def add(self, event: dict[str, Any], cut: dict[str, int], rung_evaluations: int = 0) -> None:
        """``cut``: the futures pruning stopped, each with the steps it had trained;
        ``rung_evaluations``: evaluation batches spent to rank them."""
        futures, horizon = event["futures"], event["horizon"]
        evals = len(futures[0]["eval"])
        scores = {f["name"]: f["eval"] for f in futures if f["name"] not in cut}
        winner = select(scores, "control", candidates=len(futures) - 1, seed=event["number"]).chosen
        self.events += 1
        self.same += winner == event["selection"]["chosen"]
        self.spent += len(futures) * (horizon + EVAL_COST * evals)
        self.saved += sum(horizon - trained + EVAL_COST * evals for trained in cut.values()) - EVAL_COST * rung_evaluations

    def figures(self) -> dict[str, Any]:
        return {"compute_saved": self.saved / self.spent if self.spent else 0.0,
                "same_winner_rate": self.same / self.events if self.events else 0.0, "events": self.events}  # fmt: skip


def _replay(event: dict[str, Any], main: list[list[Any]], rule: Pruning, rungs: list[int],
            history: list[dict[str, Any]]) -> tuple[dict[str, int], dict[str, Any]]:  # fmt: skip
    """(the futures cut, each with the steps it trained; the forecasts at the last
    rung) when ``rule`` cuts the event's futures after each of ``rungs`` steps in
    turn, among those still going."""
    going = list(event["futures"])
    cut: dict[str, int] = {}
    forecasts: dict[str, Any] = {}
    for rung in rungs:
        prefixes = {}
        for future in going:
            prefix = future["metrics"][:rung]
            finite = len(prefix) == rung and all(m[1] is not None and math.isfinite(m[1]) for m in prefix)
            prefixes[future["name"]] = prefix if finite else None
        kept, forecasts, _ = rule.decide(main, event["origin"]["step"] or 0, event["horizon"], prefixes, history)
        cut.update((f["name"], rung) for f in going if f["name"] not in kept)
        going = [f for f in going if f["name"] in kept]
    return cut, forecasts
