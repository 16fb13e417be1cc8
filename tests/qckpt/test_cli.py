"""The qckpt command line: real subprocesses for wiring and exit codes, main() for breadth."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qckpt
from bench.compare import differences
from qckpt.cli import main


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qckpt", *args], capture_output=True, text=True)


def _cli(capsys: pytest.CaptureFixture[str], repo: Path, *args: str) -> tuple[int, str]:
    code = main(["-R", str(repo), *args])
    return code, capsys.readouterr().out


@pytest.fixture
def populated(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    with qckpt.Repository.init(path, chunk_size=256) as repo:
        for i in range(4):
            repo.commit({"w": torch.full((200,), float(i)), "b": torch.zeros(3)}, step=i, metrics={"loss": 4.0 - i})
        repo.create_branch("alt", "main@1")
        repo.commit({"w": torch.randn(200), "b": torch.zeros(3)}, branch="alt", step=2, metrics={"loss": 0.5},
                    lossy=qckpt.LossyTier(10, min_elements=100))  # fmt: skip
    return path


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "qckpt"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "fsck" in result.stdout


def test_init_and_exit_codes_in_a_real_process(tmp_path: Path) -> None:
    path = str(tmp_path / "r")
    assert _run("init", path).returncode == 0
    again = _run("init", path)
    assert again.returncode == 4 and "qckpt: error: a repository exists already" in again.stderr
    missing = _run("-R", str(tmp_path / "nowhere"), "log")
    assert missing.returncode == 3 and "no qckpt repository" in missing.stderr
    assert not (tmp_path / "nowhere").exists()


def test_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "r"
    assert main(["init", str(path)]) == 0
    capsys.readouterr()
    assert _cli(capsys, path, "log") == (0, "")
    assert _cli(capsys, path, "show", "nope")[0] == 3
    assert _cli(capsys, path, "branch", "bad/name")[0] == 2
    code = main(["-R", str(path), "gc", "--keep-newer-than", "soon"])
    assert code == 2 and "invalid duration 'soon'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["frobnicate"])
    assert usage.value.code == 2
    with pytest.raises(SystemExit) as usage:  # a revision where an option is wanted: the command's own usage says so
        main(["-R", str(path), "fork", "x", "main"])
    err = capsys.readouterr().err
    assert usage.value.code == 2 and "usage: qckpt fork [-h] [--at AT] name" in err and "unrecognized arguments: main" in err


def test_storage_that_cannot_be_used_is_not_reported_as_damage(capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    code = main(["-R", "s3://bucket/repo", "--endpoint-url", "http://127.0.0.1:9", "fsck"])
    assert code == 5 and "no AWS credentials found" in capsys.readouterr().err


def test_fsck_exit_status_reports_damage(populated: Path) -> None:
    ok = _run("-R", str(populated), "fsck")
    assert ok.returncode == 0 and "no problems found" in ok.stdout
    pack = max((populated / "packs").iterdir(), key=lambda p: p.stat().st_size)
    data = bytearray(pack.read_bytes())
    data[20] ^= 1
    pack.write_bytes(bytes(data))
    bad = _run("-R", str(populated), "fsck")
    assert bad.returncode == 1 and "DAMAGED object" in bad.stdout and "affects snapshot" in bad.stdout



def test_fsck_json(populated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pack = max((populated / "packs").iterdir(), key=lambda p: p.stat().st_size)
    pack.write_bytes(pack.read_bytes()[:-1])  # the trailer: the pack's footer no longer parses
    code, out = _cli(capsys, populated, "fsck", "--json")
    report = json.loads(out)
    assert code == 1 and report["ok"] is False
    assert [p["subject"] for p in report["problems"]] == [f"pack {pack.stem}"]


def test_history_commands(populated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _cli(capsys, populated, "log")
    assert code == 0 and len(out.splitlines()) == 4 and "(main) step 3 loss=1" in out
    assert "lossy" not in out
    code, out = _cli(capsys, populated, "log", "alt")
    assert code == 0 and out.splitlines()[0].endswith("(alt) step 2 [lossy: 10 mantissa bits] loss=0.5")
    code, out = _cli(capsys, populated, "log", "--graph")
    assert code == 0 and [line.split("  ")[0] for line in out.splitlines()] == ["*", "| *", "| *", "|/", "*", "*"]
    code, out = _cli(capsys, populated, "log", "--json", "-n", "2")
    assert [s["step"] for s in json.loads(out)] == [3, 2]
    code, out = _cli(capsys, populated, "show", "alt", "--json")
    shown = json.loads(out)
    assert shown["snapshot"]["metrics"] == {"loss": 0.5} and {t["path"] for t in shown["tensors"]} == {"w", "b"}
    code, out = _cli(capsys, populated, "show", "main@1")
    assert code == 0 and "step      1" in out and "2 tensors:" in out


def test_show_names_optimizer_state_by_parameter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    with qckpt.Repository.init(tmp_path / "repo") as repo:
        repo.commit(qckpt.TrainingState(model=model, optimizer=opt), step=1)
    code, out = _cli(capsys, tmp_path / "repo", "show", "main")
    line = next(x for x in out.splitlines() if "components/optimizer/state/2/exp_avg_sq" in x)
    assert code == 0 and line.endswith("of components/model/2.weight")
    code, out = _cli(capsys, tmp_path / "repo", "show", "main", "--json")
    owners = {t["path"]: t["parameter"] for t in json.loads(out)["tensors"]}
    assert owners["components/optimizer/state/1/exp_avg"] == "components/model/0.bias"
    assert owners["components/model/0.bias"] is None


def test_graph_draws_forks_and_joins(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with qckpt.Repository.init(tmp_path / "repo") as repo:
        for i in range(3):
            repo.commit({"w": torch.full((3,), float(i))}, step=i)
        for name, losses in (("lower-lr", (1.0, 0.5)), ("skip", (3.0,))):
            repo.create_branch(name, at="main@1")
            for n, loss in enumerate(losses):
                repo.commit({"w": torch.full((3,), 10.0 * len(name) + n)}, branch=name, step=2 + n, metrics={"loss": loss})
        repo.commit({"w": torch.full((3,), 4.0)}, step=3)
        repo.join("main", ["lower-lr", "skip"], metric="loss")
    code, out = _cli(capsys, tmp_path / "repo", "log", "--graph")
    graph = [line.split("  ")[0] for line in out.splitlines()]
    assert code == 0 and graph == ["*", "|\\ \\", "* | |", "| | *", "| * |", "| * |", "| |/", "* |", "|/", "*", "*"], out
    assert "join main: picked lower-lr" in out.splitlines()[0]


def test_ref_commands(populated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(capsys, populated, "fork", "try", "--at", "main@2")[0] == 0
    assert _cli(capsys, populated, "tag", "best", "--at", "alt")[0] == 0
    code, out = _cli(capsys, populated, "branch", "--json")
    assert set(json.loads(out)) == {"main", "alt", "try"}
    with qckpt.Repository.open(populated) as repo:
        assert repo.branches()["try"] == repo.resolve("main@2") and repo.tags() == {"best": repo.resolve("alt")}
    assert _cli(capsys, populated, "branch", "-d", "try")[0] == 0
    code, out = _cli(capsys, populated, "tag", "-d", "best")
    undo = out.split("`")[1].split()  # the message names the command that brings the tag back
    assert code == 0 and undo[:3] == ["qckpt", "tag", "best"]
    assert _cli(capsys, populated, "branch", "-d", "try")[0] == 3
    code, out = _cli(capsys, populated, "tag")
    assert code == 0 and out == ""
    assert _cli(capsys, populated, *undo[1:])[0] == 0
    with qckpt.Repository.open(populated) as repo:
        assert repo.tags() == {"best": repo.resolve("alt")}


def test_diff_du_gc_export(populated: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out = _cli(capsys, populated, "diff", "main", "alt", "--json")
    assert {d["path"]: d["status"] for d in json.loads(out)} == {"w": "changed", "b": "same"}
    code, out = _cli(capsys, populated, "diff", "main", "alt")
    assert "1 of 2 tensors differ" in out
    code, out = _cli(capsys, populated, "du", "--json")
    du = json.loads(out)
    assert du["repository"]["snapshots"] == 5 and du["branches"]["alt"]["snapshots"] == 3
    code, out = _cli(capsys, populated, "gc", "--keep-last", "1", "--dry-run", "--json")
    assert json.loads(out)["snapshots_deleted"] == 3 and json.loads(out)["dry_run"] is True
    code, out = _cli(capsys, populated, "gc", "--keep-last", "1", "--dry-run")
    assert code == 0 and "would keep 2 snapshots and delete 3 snapshots" in out and "nothing was deleted" in out
    code, out = _cli(capsys, populated, "gc", "--keep-best", "loss:1:max")
    assert code == 0 and "deleted 2 snapshots" in out and "freed" in out  # kept: both heads and step 0 (loss 4)
    code, out = _cli(capsys, populated, "export", "main", str(tmp_path / "x.zarr"))
    assert code == 0 and (tmp_path / "x.zarr" / "zarr.json").exists()


def test_export_to_torch_and_safetensors(populated: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    with qckpt.Repository.open(populated) as repo:
        expected = repo.load("alt").tree()
    code, out = _cli(capsys, populated, "export", "alt", str(tmp_path / "alt.pt"))
    assert code == 0 and "a torch.save file" in out
    assert differences(torch.load(tmp_path / "alt.pt", weights_only=True), expected) == []
    code, out = _cli(capsys, populated, "export", "alt", str(tmp_path / "alt.bin"), "--format", "safetensors")
    assert code == 0 and "a safetensors file" in out
    assert differences(dict(sorted(load_file(tmp_path / "alt.bin").items())), dict(sorted(expected.items()))) == []
    code, _ = _cli(capsys, populated, "export", "alt", str(tmp_path / "alt.pt"))
    assert code == 4  # exists already: nothing overwritten
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_du_counts_what_only_each_branch_holds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with qckpt.Repository.init(tmp_path / "repo") as repo:
        repo.commit({"shared": torch.arange(4096.0)}, step=0)
        repo.create_branch("side", at="main")
        repo.commit({"shared": torch.arange(4096.0), "own": torch.ones(8192)}, branch="side", step=1)
        usage = repo.usage()
        before = repo.stats().stored_bytes
        assert usage["main"].exclusive_bytes == 0  # its history is side's history too
        assert usage["side"].exclusive_objects == 1 and usage["side"].exclusive_bytes > 0
        repo.delete_branch("side")
        repo.gc(qckpt.RetentionPolicy(reflog_grace=0))
        freed = before - repo.stats().stored_bytes
        assert freed >= usage["side"].exclusive_bytes  # plus its snapshot record and manifest
    code, out = _cli(capsys, tmp_path / "repo", "du")
    assert code == 0 and "exclusive" in out and "what deleting the branch frees" in out


def test_reset_reflog_and_branch_restore(populated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with qckpt.Repository.open(populated) as repo:
        head, alt = repo.snapshot("main"), repo.snapshot("alt")
    assert main(["-R", str(populated), "reset", "mian", "main@1"]) == 3  # a typo creates no branch
    err = capsys.readouterr().err
    assert "no branch named 'mian' to move (branches: alt, main)" in err and "`qckpt branch mian --at main@1` creates one" in err
    assert "restore" not in err
    code, out = _cli(capsys, populated, "reset", "main", "main@1")
    assert code == 0 and f"{head.short_id} -> " in out and "ref log" in out
    code, out = _cli(capsys, populated, "branch", "-d", "alt")
    assert code == 0 and f"it was at {alt.short_id}" in out and "`qckpt branch --restore alt` brings it back" in out
    code, out = _cli(capsys, populated, "reflog")
    lines = out.splitlines()
    assert "heads/alt" in lines[0] and "delete" in lines[0] and "left its old snapshot behind" in lines[0]
    assert "heads/main" in lines[1] and "reset" in lines[1] and "mian" not in out
    code, out = _cli(capsys, populated, "reflog", "main", "--json")
    assert code == 0 and json.loads(out)[0]["old"] == head.id
    assert main(["-R", str(populated), "reflog", "never-existed"]) == 3
    assert "no branch or tag named 'never-existed'" in capsys.readouterr().err
    _cli(capsys, populated, "branch", "-d", "main")
    assert main(["-R", str(populated), "reset", "main", "alt"]) == 3  # deleted: not re-created by a reset either
    assert "no branches); `qckpt branch main --at alt` creates one; it was deleted: `qckpt branch --restore main` brings it back" in capsys.readouterr().err
    for listing in ("log", "branch"):
        assert main(["-R", str(populated), listing]) == 0
        assert capsys.readouterr().err == "no branches; deleted: alt, main (`qckpt branch --restore NAME` brings one back)\n"
    assert main(["-R", str(populated), "tag"]) == 0 and capsys.readouterr().err.startswith("no tags yet")
    assert _cli(capsys, populated, "branch", "--restore", "main")[0] == 0
    code, out = _cli(capsys, populated, "branch", "--restore", "alt")
    assert code == 0 and alt.short_id in out
    assert _cli(capsys, populated, "branch", "--restore", "alt")[0] == 4  # exists: a conflict
    with qckpt.Repository.open(populated) as repo:
        assert repo.branches()["alt"] == alt.id


def test_gc_asks_before_expiring_most_of_the_history(populated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["-R", str(populated), "gc", "--keep-last", "1"])  # would expire 3 of 5 snapshots
    err = capsys.readouterr().err
    assert code == 2 and "would delete 3 of 5 snapshots" in err and "--yes" in err
    with qckpt.Repository.open(populated) as repo:
        assert len(repo.log("main", "alt")) == 5  # nothing deleted
    code, out = _cli(capsys, populated, "gc", "--keep-last", "1", "--yes")
    assert code == 0 and "deleted 3 snapshots" in out
    assert _cli(capsys, populated, "gc", "--keep-best", "los:2", "--yes")[0] == 2  # a misspelt metric is an error
    for bad in ("loss:0", "loss:2:up", "loss:x", ":2"):  # the error says what the option takes, in its own terms
        assert main(["-R", str(populated), "gc", "--keep-best", bad, "--yes"]) == 2
        assert "use METRIC[:K[:min|max]], K at least 1" in capsys.readouterr().err


def test_version_empty_names_max_chain_and_a_closed_pipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run("--version").stdout.strip() == f"qckpt {qckpt.__version__}"
    path = tmp_path / "r"
    assert main(["init", str(path), "--max-chain", "4"]) == 0
    assert qckpt.Repository.open(path).config.max_chain == 4
    with qckpt.Repository.open(path) as repo:
        repo.commit({f"t{i}": torch.zeros(1) for i in range(3000)})  # `show` prints far more than a pipe buffers
    capsys.readouterr()
    assert _cli(capsys, path, "branch", "")[0] == 2  # an empty name is an error, not a listing
    piped = subprocess.run(f"{sys.executable} -m qckpt -R {path} show main | head -1", shell=True, capture_output=True, text=True)
    assert piped.stdout.count("\n") == 1 and "Traceback" not in piped.stderr and "Broken pipe" not in piped.stderr
