"""The light cone end to end on the reference model: rollouts are bit-exact with a
manual restore + train, an injected spike is recovered from and recorded, the
record and report come from a repository reopened in a new process, and bad
input gets typed errors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

import qckpt
from bench.compare import differences
from bench.spike import Batches, Workload, cone_step
from branch import ConeConfig, ConeRecord, Controls, Future, LightCone, ScaleLR, StepResult

STEPS = 100


def _cone(repo: qckpt.Repository, workload: Workload, scenario: str, resume: str | None = None, **config: Any) -> LightCone:
    run = workload.new_run(scenario, 0)
    if resume is not None:
        repo.restore(run.state, resume)
    evaluate = lambda s: workload.losses(s.components["model"], workload.validation[:4])  # noqa: E731
    return LightCone(repo, run.state, cone_step, run.batches, evaluate,
                     config=ConeConfig(**{"horizon": 8, "commit_every": 4, "resamples": 300} | config))  # fmt: skip


def _train(cone: LightCone, steps: int) -> None:
    """``steps`` steps of the cone's own loop, observed (committed on its cadence)."""
    for _ in range(steps):
        cone.observe(cone.train_step(next(cone.batches)))


def test_a_rollout_is_bit_exact_with_a_manual_restore_and_train(tmp_path: Path) -> None:
    workload = Workload(STEPS)
    with qckpt.Repository.init(tmp_path / "r") as repo:
        cone = _cone(repo, workload, "clean")
        cone.commit()
        _train(cone, 6)
        origin = repo.snapshot("main")
        result = cone.start_future(origin, Future("lower", ScaleLR(0.5, warmback=3)))
        cone.advance_future(result, 5)
        cone.finish_future(result)
        rolled = {k: v.clone() for k, v in cone.state.components["model"].state_dict().items()}
        manual = workload.new_run("clean", 0)
        repo.restore(manual.state, origin.id)
        manual.state.scale_lr(0.5)  # by hand: halve, then warm back over 3 steps
        controls = Controls(lr_scale=0.5, lr_warmback=3)
        lrs = []
        for _ in range(5):
            lrs.append(manual.optimizer.param_groups[0]["lr"])
            cone_step(manual.state, next(manual.batches), controls)
            controls.tick(manual.state)
        assert differences(rolled, dict(manual.model.state_dict())) == []
        assert repo.load(result.snapshot).tree()["extras"] == manual.state.extras
        assert manual.state.extras["lightcone.controls"] == {"clip_grad_norm": None, "lr_scale": 1.0, "lr_warmback": 0}
        schedule = workload.new_run("clean", 0)
        repo.restore(schedule.state, origin.id)
        plain = []
        for _ in range(5):
            plain.append(schedule.optimizer.param_groups[0]["lr"])
            schedule.scheduler.step()
        assert [a / b for a, b in zip(lrs, plain)] == pytest.approx([0.5, 2 / 3, 5 / 6, 1.0, 1.0], rel=1e-12)
        assert [m[0] for m in result.metrics] == [5, 6, 7, 8, 9] and len(result.scores) == 4


def test_an_injected_spike_is_recovered_and_recorded(tmp_path: Path) -> None:
    workload = Workload(STEPS, spike_factor=300.0)  # unmistakable, even this early in training
    path = tmp_path / "r"
    with qckpt.Repository.init(path) as repo:
        cone = _cone(repo, workload, "lr_spike")
        record = cone.run(STEPS)
        assert record.events, "the injected learning-rate spike went unnoticed"
        event = record.events[0]
        spike_at = int(STEPS * 0.4)
        assert spike_at <= event["trigger"]["step"] <= spike_at + 8
        assert event["origin"]["step"] < event["trigger"]["began"]
        names = [f["name"] for f in event["futures"]]
        assert names[0] == "control" and len(names) == 5
        branches = repo.branches()
        assert all(f["branch"] in branches for f in event["futures"])  # losing futures stay as branches
        join = repo.snapshot(event["join"])
        assert set(join.parents[1:]) == {f["snapshot"] for f in event["futures"]}  # the DAG holds the cone
        chosen = next(f for f in event["futures"] if f["name"] == event["selection"]["chosen"])
        assert event["selection"]["chosen"] != "control", "the control re-ran into the spike, it should lose"
        assert repo.load(join.id).tree()["step"] == chosen["metrics"][-1][0]
        assert cone.state.step == STEPS and repo.snapshot("main").step == STEPS
        warm = set(os.listdir(path / "warm"))  # explored futures get no warm copy: a raw state each
        assert not warm & {f["snapshot"] for f in event["futures"]} and repo.snapshot("main").id in warm
    script = textwrap.dedent(f"""
        import qckpt
        from branch import ConeRecord, write_report
        with qckpt.Repository.open({str(path)!r}) as repo:
            record = ConeRecord.load(repo, "main")
            print(len(record.events), record.events[0]["selection"]["chosen"])
            html, png = write_report(repo, "main", {str(tmp_path / "report")!r})
            print(html.stat().st_size, png.read_bytes()[:4] == b"\\x89PNG")
    """)  # a new process reads the record and draws the report from the repository alone
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"{len(record.events)} {event['selection']['chosen']}" and lines[1].endswith("True")
    page = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in page and event["selection"]["chosen"] in page and "Event 1" in page
    cli = subprocess.run([sys.executable, "-m", "qckpt", "-R", str(path), "cone", "list"], capture_output=True, text=True)
    assert cli.returncode == 0 and cli.stdout.startswith("main") and "events" in cli.stdout
    out_base = tmp_path / "cli-report"
    cli = subprocess.run([sys.executable, "-m", "qckpt", "-R", str(path), "cone", "report", "-o", str(out_base)],
                         capture_output=True, text=True)  # fmt: skip
    assert cli.returncode == 0 and (tmp_path / "cli-report.html").exists() and (tmp_path / "cli-report.png").exists()
    cli = subprocess.run([sys.executable, "-m", "qckpt", "-R", str(path), "cone", "report", "nope"], capture_output=True, text=True)
    assert cli.returncode == 3 and "no light-cone record for run 'nope'" in cli.stderr


def test_a_report_goes_to_a_local_directory_made_for_it(tmp_path: Path) -> None:
    from branch import write_report

    with qckpt.Repository.init(tmp_path / "r") as repo:
        _cone(repo, Workload(STEPS), "clean").run(12)
        (tmp_path / "afile").write_text("mine")
        with pytest.raises(qckpt.InvalidInputError, match="afile is not a directory"):
            write_report(repo, "main", tmp_path / "afile" / "report")
        with pytest.raises(qckpt.InvalidInputError, match="local path"):  # Path would make a directory named 's3:'
            write_report(repo, "main", "s3://bucket/report")
        html, png = write_report(repo, "main", tmp_path / "new" / "report.html")
    assert html == tmp_path / "new" / "report.html" and png.read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "afile").read_text() == "mine" and not (tmp_path / "s3:").exists()


def test_cone_commands_on_a_repository_without_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from qckpt.cli import main

    qckpt.Repository.init(tmp_path / "r").close()
    assert main(["-R", str(tmp_path / "r"), "cone", "list"]) == 0
    assert capsys.readouterr().out == "no light-cone runs recorded in this repository\n"
    assert main(["-R", str(tmp_path / "r"), "cone", "report"]) == 3
    assert "no light-cone runs recorded in this repository: nothing to report on" in capsys.readouterr().err


def test_bad_input_is_a_typed_error(tmp_path: Path) -> None:
    workload = Workload(STEPS)
    with qckpt.Repository.init(tmp_path / "r") as repo:
        run = workload.new_run("clean", 0)
        with pytest.raises(qckpt.InvalidInputError, match="no state_dict"):
            LightCone(repo, run.state, cone_step, iter([1, 2]))
        loose = Batches(workload.train_data, seed=3)
        with pytest.raises(qckpt.InvalidInputError, match="component of the TrainingState"):
            LightCone(repo, run.state, cone_step, loose)
        with pytest.raises(qckpt.InvalidInputError, match="horizon"):
            ConeConfig(horizon=0)
        for bad in ({"confidence": 95}, {"confidence": 0.0}, {"resamples": 0}, {"seed": "0"}, {"pruning": 0.5}):
            with pytest.raises(qckpt.InvalidInputError, match=next(iter(bad))):  # at construction, not at the first event
                ConeConfig(**bad)  # type: ignore[arg-type]
        cone = _cone(repo, workload, "clean", horizon=STEPS + 20)
        with pytest.raises(qckpt.InvalidInputError, match="longer than the run"):
            cone.run(STEPS)
        with pytest.raises(qckpt.InvalidInputError, match="steps must be"):
            cone.run(str(STEPS))  # type: ignore[arg-type]
        cone = LightCone(repo, run.state, cone_step, run.batches, interventions=lambda situation: ["lower the lr"])  # type: ignore[list-item]
        with pytest.raises(qckpt.InvalidInputError, match="not an Intervention"):
            cone.explore(_fake_trigger(cone))
    with pytest.raises(qckpt.RevisionNotFoundError, match="no light-cone record"):
        with qckpt.Repository.open(tmp_path / "r") as repo:
            ConeRecord.load(repo, "nope")


def test_a_later_event_never_rolls_back_onto_the_abandoned_steps(tmp_path: Path) -> None:
    from branch import Trigger

    workload = Workload(STEPS)
    with qckpt.Repository.init(tmp_path / "r") as repo:
        cone = _cone(repo, workload, "clean", rollback=8)
        _train(cone, 20)
        first = cone.explore(Trigger(20, 1.0, 1.0, 20, ()))
        assert first.origin.step == 12 and first.join.step == 20
        abandoned = repo.snapshot("main@16")  # the old head's line, before the join
        assert abandoned.id not in {first.origin.id, first.join.id}
        later = cone.origin_for(Trigger(24, 1.0, 1.0, 24, ()))  # 8 steps before 24: step 16 of the chosen future
        assert later.id == repo.snapshot(f"{first.chosen.branch}@16").id != abandoned.id
        assert cone.origin_for(Trigger(22, 1.0, 1.0, 22, ())).id == first.origin.id  # before the future's commits


@pytest.mark.parametrize("hidden", ["every pack", "the origin's chain"])
def test_the_run_continues_from_the_join_reading_only_the_futures_own_packs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hidden: str
) -> None:
    """The likely choices' horizon snapshots (the control's, the best alternative's)
    stay hot until the join is restored, which then reads no pack at all: with
    every pack moved aside once the join is made, the run still continues, from
    exactly the join's state. And the origin stays hot as long, so when the
    chosen future is not kept (here: nothing is offered), its commits, which
    predict from the origin, decode back to it and no further: with the packs
    of the origin's own chain moved aside, the run continues just as well."""
    import shutil

    from branch import Trigger
    from branch.engine import _LikelyChoices

    if hidden == "the origin's chain":
        monkeypatch.setattr(_LikelyChoices, "offer", lambda self, result: None)
    packs, aside = tmp_path / "r" / "packs", tmp_path / "aside"
    aside.mkdir()
    with qckpt.Repository.init(tmp_path / "r", warm=False) as repo:
        cone = _cone(repo, Workload(STEPS), "clean", rollback=8)
        _train(cone, 12)  # commits every 4 steps: the event's origin is the one at step 12
        repo.flush()
        older = set(os.listdir(packs))
        _train(cone, 8)
        join = repo.join
        moved: list[str] = []

        def join_then_hide_packs(*args: Any, **kwargs: Any) -> qckpt.Snapshot:
            snap = join(*args, **kwargs)
            moved.extend(os.listdir(packs) if hidden == "every pack" else older)
            for name in moved:
                shutil.move(packs / name, aside / name)
            return snap

        repo.join = join_then_hide_packs  # type: ignore[method-assign]
        decision = cone.explore(Trigger(20, 1.0, 1.0, 20, ()))
        assert decision.origin.step == 12 and moved
        for name in moved:
            shutil.move(aside / name, packs / name)
        live = {k: v.clone() for k, v in cone.state.components["model"].state_dict().items()}
        assert differences(live, repo.load(decision.join.id).tree()["components"]["model"]) == []


def test_the_commits_an_event_could_roll_back_to_keep_their_warm_copies(tmp_path: Path) -> None:
    """The run's commits from the newest one at least ``rollback`` steps before now
    (nothing elevated) keep their warm copies, older ones lose them: an event's
    origin restores from its copy, so the whole event reads no pack written
    before it, and still continues from exactly the join's state. The abandoned
    line's copies go then, and the rest when the run ends (but the head's)."""
    import shutil

    from branch import Trigger

    packs, aside = tmp_path / "r" / "packs", tmp_path / "aside"
    aside.mkdir()
    with qckpt.Repository.init(tmp_path / "r") as repo:
        cone = _cone(repo, Workload(STEPS), "clean", rollback=8)
        _train(cone, 20)  # commits every 4 steps
        repo.flush()

        def warm_steps() -> set[int | None]:
            return {repo.snapshot(i).step for i in os.listdir(tmp_path / "r" / "warm")}

        assert warm_steps() == {12, 16, 20}
        older = os.listdir(packs)
        for name in older:
            shutil.move(packs / name, aside / name)
        decision = cone.explore(Trigger(20, 1.0, 1.0, 20, ()))
        for name in older:
            shutil.move(aside / name, packs / name)
        assert decision.origin.step == 12
        live = {k: v.clone() for k, v in cone.state.components["model"].state_dict().items()}
        assert differences(live, repo.load(decision.join.id).tree()["components"]["model"]) == []
        repo.flush()
        assert 12 in warm_steps() and 16 not in warm_steps()  # abandoned (20, the old head's, goes with main's next commit)
        cone.run(STEPS)
        repo.flush()
        assert warm_steps() - {None} == {STEPS}  # the head's (None: the record's branch head)


def test_a_resumed_run_watches_on_with_its_detectors_memory(tmp_path: Path) -> None:
    workload = Workload(STEPS)
    with qckpt.Repository.init(tmp_path / "r") as repo:
        first = _cone(repo, workload, "clean")
        _train(first, 32)
        memory = first.index.state_dict()  # the index as it was at the step-32 commit
        assert len(memory["detectors"][1]["losses"]) >= 25  # LossSpike warmed up
        again = _cone(repo, workload, "clean", resume="main")  # a new process picks the run up at step 32
        assert again.state.step == 32 and again.index.state_dict() == memory
        fresh = _cone(repo, workload, "clean", resume="main", horizon=8)  # another index, same detectors: also loads
        assert fresh.index.state_dict() == memory
        from branch import InstabilityIndex, LossSpike

        other = LightCone(repo, again.state, cone_step, again.batches, index=InstabilityIndex([LossSpike()]))
        assert other.index.state_dict()["detectors"][0]["losses"] == []  # changed detectors start afresh


def _fake_trigger(cone: LightCone) -> Any:
    from branch import InstabilityIndex, Observation

    cone.commit()
    index = InstabilityIndex(total_steps=STEPS)
    return index.observe(Observation(cone.state.step, float("nan")))


def test_roll_back_is_a_recorded_reset_and_a_restore(tmp_path: Path) -> None:
    workload = Workload(STEPS)
    with qckpt.Repository.init(tmp_path / "r") as repo:
        cone = _cone(repo, workload, "clean")
        _train(cone, 9)
        origin = repo.snapshot("main@4")
        expected = repo.load(origin.id).tree()["components"]["model"]
        cone.roll_back(origin)
        assert repo.branches()["main"] == origin.id and repo.reflog("main")[0].cause.startswith("reset")
        assert cone.state.step == 4 and [m[0] for m in cone.record.main] == [1, 2, 3, 4]
        assert differences(dict(cone.state.components["model"].state_dict()), expected) == []
        cone.observe(cone.train_step(next(cone.batches)))
        cone.commit()  # continues on main from the origin (no DivergedError): its parent is the origin
        assert repo.snapshot("main").parents == (origin.id,) and repo.snapshot("main").step == 5


def test_an_event_whose_rollouts_fail_puts_the_run_back_at_its_branch_head(tmp_path: Path) -> None:
    workload = Workload(STEPS)
    with qckpt.Repository.init(tmp_path / "r") as repo:
        cone = _cone(repo, workload, "clean")
        _train(cone, 10)
        trigger = _fake_trigger(cone)  # commits step 10: the branch head
        head = repo.snapshot("main")
        expected = repo.load(head.id).tree()["components"]["model"]
        calls = 0

        def failing(state: Any, batch: Any, controls: Any) -> Any:  # the second future's third step raises
            nonlocal calls
            calls += 1
            if calls == 8 + 3:
                raise RuntimeError("boom")
            return cone_step(state, batch, controls)

        cone.step_fn = failing
        with pytest.raises(RuntimeError, match="boom") as info:
            cone.explore(trigger)
        assert any("nothing was joined; the live state is main's head again" in n for n in info.value.__notes__)
        assert repo.branches()["main"] == head.id and cone.state.step == 10 and cone.record.main[-1][0] == 10
        assert differences(dict(cone.state.components["model"].state_dict()), expected) == []  # not the future's weights
        cone.step_fn = cone_step
        _train(cone, 2)  # the run goes on along main (no DivergedError): its next commit's parent is the head
        assert repo.snapshot("main").parents == (head.id,) and repo.snapshot("main").step == 12


class _FullDisk(qckpt.LocalBackend):
    """A local backend whose pack writes fail while ``full`` (a full disk)."""

    full = False

    def put(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        if self.full and key.startswith("packs/"):
            raise qckpt.BackendError("injected: no space left on device")
        super().put(key, data, exclusive=exclusive)


def test_a_futures_commit_failing_in_the_background_fails_the_event(tmp_path: Path) -> None:
    """Futures commit asynchronously; a failed write (a full disk) is raised by the
    event, never dropped, and the run is put back at its branch head."""
    backend = _FullDisk(tmp_path / "r")
    with qckpt.Repository.init(backend) as repo:
        cone = _cone(repo, Workload(STEPS), "clean", commit_every=100)
        _train(cone, 10)
        trigger = _fake_trigger(cone)
        head = repo.snapshot("main")
        backend.full = True
        with pytest.raises(qckpt.BackendError, match="no space left") as info:
            cone.explore(trigger)
        assert any("nothing was joined" in n for n in info.value.__notes__)
        backend.full = False
        assert repo.branches()["main"] == head.id and cone.state.step == 10


def test_a_failing_step_after_a_failed_background_commit_still_puts_the_run_back(tmp_path: Path) -> None:
    """A future's commit fails in the background (a full disk), then its training
    fails for another reason before anything raised the first failure: the event
    raises the second, notes the first, and the run is back at its branch head."""
    backend = _FullDisk(tmp_path / "r")
    with qckpt.Repository.init(backend) as repo:
        cone = _cone(repo, Workload(STEPS), "clean")  # futures commit every 4 of their 8 steps
        _train(cone, 10)
        trigger = _fake_trigger(cone)
        head = repo.snapshot("main")
        expected = repo.load(head.id).tree()["components"]["model"]
        calls = 0

        def failing(state: Any, batch: Any, controls: Any) -> Any:  # the second future's third step raises
            nonlocal calls  # after the control's commit at the horizon (its first new chunks) failed
            calls += 1
            if calls == 8 + 3:
                raise RuntimeError("boom")
            return cone_step(state, batch, controls)

        cone.step_fn = failing
        backend.full = True
        with pytest.raises(RuntimeError, match="boom") as info:
            cone.explore(trigger)
        backend.full = False
        notes = info.value.__notes__
        assert any("failed in the background as well" in n and "no space left" in n for n in notes), notes
        assert any("nothing was joined; the live state is main's head again" in n for n in notes), notes
        assert repo.branches()["main"] == head.id and cone.state.step == head.step
        assert differences(dict(cone.state.components["model"].state_dict()), expected) == []


@pytest.mark.parametrize("returned, says", [(2.5, "one loss per held-out batch"), (None, "one loss per held-out batch"),
                                             (["a"], "one loss per held-out batch"), ([], "no losses")])  # fmt: skip
def test_an_evaluate_that_returns_no_per_batch_losses_is_a_typed_error(tmp_path: Path, returned: Any, says: str) -> None:
    workload = Workload(STEPS)
    with qckpt.Repository.init(tmp_path / "r") as repo:
        cone = _cone(repo, workload, "clean", horizon=2)
        _train(cone, 4)
        cone.evaluate = lambda state: returned
        with pytest.raises(qckpt.InvalidInputError, match=says):
            cone.explore(_fake_trigger(cone))
        assert cone.state.step == 4  # back at the head, as after any failed event


@pytest.mark.parametrize("returned", [None, torch.ones(3), StepResult(None)])  # type: ignore[arg-type]
def test_a_step_fn_that_returns_no_loss_is_a_typed_error_and_counts_no_step(tmp_path: Path, returned: Any) -> None:
    with qckpt.Repository.init(tmp_path / "r") as repo:
        cone = _cone(repo, Workload(STEPS), "clean")
        cone.step_fn = lambda state, batch, controls: returned
        with pytest.raises(qckpt.InvalidInputError, match="step_fn must return the loss"):
            cone.train_step(next(cone.batches))
        assert cone.state.step == 0 and cone.record.compute["train_steps"] == 0


def test_a_resumed_run_continues_its_record_and_redoes_an_unfinished_event(tmp_path: Path) -> None:
    workload = Workload(STEPS, spike_factor=300.0)
    with qckpt.Repository.init(tmp_path / "r") as repo:
        first = _cone(repo, workload, "lr_spike")
        first.run(60)  # the spike at step 40 makes an event (or more)
        n = len(first.record.events)
        assert n >= 1
        again = _cone(repo, workload, "lr_spike", resume="main")  # a new process picks the run up
        assert len(again.record.events) == n and again.record.main[-1][0] == again.state.step == 60
        name = f"main.e{n + 1}.control"
        left_over = repo.create_branch(name, "main@52")  # as if a crash interrupted the next event
        decision = again.explore(_fake_trigger(again))
        assert decision.results[0].branch == name and len(again.record.events) == n + 1
        log = repo.reflog(name)  # the unfinished attempt was reset away, on the record
        assert any(e.old == left_over.id and e.cause.startswith("reset") for e in log)
        assert ConeRecord.load(repo, "main").events[n]["number"] == n + 1
