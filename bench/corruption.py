"""``python -m bench corruption``: damage one repository file at a time and check
that nothing ever goes quietly wrong.

A template repository on local disk holds real training states of the
reference workload (AdamW, so predictive and delta objects are in play) on
two branches, a tag, a join, and a lossy snapshot that only the ref log
keeps (its branch was reset away). Each trial copies
it, damages one file of one kind (pack body, pack footer, pack trailer,
manifest, snapshot record, branch or tag ref, ref log record, config, GC
generation ref, chunk index) by flipping one random byte or truncating it at
a random length, and then, in that order:

1. opens the repository and restores every snapshot: each must be bit-exact
   or raise a ``qckpt`` error;
2. runs fsck: it must not raise, and must report a problem whenever a restore
   failed;
3. runs garbage collection (default policy: keep everything) and restores
   every snapshot that restored before: each must still be bit-exact (GC may
   refuse, with a ``qckpt`` error, but must never lose what was readable);
4. drops the chunk index cache and restores every snapshot again from a new
   process view (the index rebuilt from pack footers): bit-exact or a
   ``qckpt`` error, and an error only if fsck reported damage in step 2.

An outcome is *bad* when a restore returns wrong bits, anything raises an
exception that is not a ``QckptError``, fsck calls a repository healthy that
failed a restore, or GC loses a snapshot. Trials run in this process; the
caller runs it in a subprocess so that a signal (SIGBUS, SIGSEGV) is caught too.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import qckpt
from qckpt.format.packs import TRAILER_SIZE
from bench.compare import differences
from bench.workload import Trainer

KINDS = ("pack-body", "pack-footer", "pack-trailer", "manifest", "snapshot", "branch-ref", "tag-ref",
         "reflog", "config", "gc-generation", "index")  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trials", type=int, default=300, help="damaged copies to check (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")


def build_template(path: Path) -> dict[str, Any]:
    """A small but realistic repository at ``path``; returns every snapshot's tree by id."""
    trainer = Trainer("tiny", total_steps=12)
    with qckpt.Repository.init(path, chunk_size=1 << 14, max_chain=4) as repo:
        for _ in range(6):
            loss = trainer.train_step()
            repo.commit(trainer.state, metrics={"loss": loss})
        repo.create_tag("early", "main@2")
        repo.create_branch("side", "main@4")
        repo.restore(trainer.state, "main@4")
        for _ in range(2):
            loss = trainer.train_step()
            repo.commit(trainer.state, branch="side", metrics={"loss": loss})
        repo.commit(trainer.state, branch="lossy", lossy=qckpt.LossyTier(10), metrics={"loss": loss})
        repo.join("main", ["side"], metric="loss")
        repo.reset("lossy", "main@1")  # the lossy snapshot is now kept only by the ref log's grace period
        repo.gc(qckpt.RetentionPolicy())  # a GC generation ref, and the ref log of a real run
        expected = {sid: repo.load(sid).tree() for sid in repo.snapshot_ids()}
        assert repo.fsck().ok
    return expected


def _files(repo: Path, kind: str) -> list[Path]:
    pattern = {
        "pack-body": "packs/*", "pack-footer": "packs/*", "pack-trailer": "packs/*", "manifest": "manifests/*",
        "snapshot": "snapshots/*", "branch-ref": "refs/heads/*", "tag-ref": "refs/tags/*", "reflog": "reflog/**/*",
        "config": "config", "gc-generation": "refs/gc/generation", "index": ".index/*.mdb",
    }[kind]  # fmt: skip
    return sorted(p for p in repo.glob(pattern) if p.is_file())


def _damage(path: Path, kind: str, rng: random.Random) -> str:
    """Flip one byte or truncate, within the region ``kind`` names; says what it did."""
    data = bytearray(path.read_bytes())
    if kind.startswith("pack-"):
        trailer = TRAILER_SIZE  # entry count (u32), footer offset (u64), magic: see docs/design.md
        body_end = int.from_bytes(data[-16:-8], "little") if len(data) >= trailer else 0
        body_end = min(body_end, max(0, len(data) - trailer))
        lo, hi = {"pack-body": (0, body_end), "pack-footer": (body_end, len(data) - trailer),
                  "pack-trailer": (len(data) - trailer, len(data))}[kind]  # fmt: skip
    else:
        lo, hi = 0, len(data)
    if hi <= lo:
        lo, hi = 0, len(data)
    hex_at = [i for i in range(lo, hi) if chr(data[i]) in "0123456789abcdef"]
    if kind in ("branch-ref", "tag-ref", "reflog", "gc-generation") and hex_at and rng.random() < 0.4:
        at = rng.choice(hex_at)  # still well-formed: only content checks can tell
        old = chr(data[at])
        data[at] = ord(rng.choice([c for c in "0123456789abcdef" if c != old]))
        path.write_bytes(bytes(data))
        return f"changed hex digit {at} of {path.name} from {old} to {chr(data[at])}"
    if not data or rng.random() < 0.3:
        cut = rng.randrange(0, max(1, len(data)))
        path.write_bytes(bytes(data[:cut]))
        return f"truncated {path.name} from {len(data)} to {cut} bytes"
    at = rng.randrange(lo, hi)
    data[at] ^= rng.randrange(1, 256)
    path.write_bytes(bytes(data))
    return f"flipped byte {at} of {path.name} ({len(data)} bytes)"


@dataclass
class Trial:
    kind: str
    damage: str
    restored: int = 0
    refused: int = 0
    fsck_problems: int = 0
    gc: str = ""
    bad: list[str] = field(default_factory=list)


def _restores(repo: qckpt.Repository, expected: dict[str, Any], trial: Trial, when: str) -> set[str]:
    ok = set()
    for sid, tree in expected.items():
        try:
            got = repo.load(sid).tree()
        except qckpt.QckptError:
            continue
        wrong = differences(got, tree)
        if wrong:
            trial.bad.append(f"{when}: snapshot {sid[:12]} restored with wrong contents: {wrong[:3]}")
        else:
            ok.add(sid)
    return ok


def run_trial(template: Path, expected: dict[str, Any], kind: str, work: Path, rng: random.Random) -> Trial:
    repo_path = work / "repo"
    shutil.rmtree(repo_path, ignore_errors=True)
    shutil.copytree(template, repo_path)
    files = _files(repo_path, kind)
    trial = Trial(kind, "no such file" if not files else _damage(rng.choice(files), kind, rng))
    try:
        try:
            repo = qckpt.Repository.open(repo_path)
        except qckpt.QckptError as e:
            trial.gc = f"open refused: {type(e).__name__}"
            return trial
        with repo:
            before = _restores(repo, expected, trial, "before gc")
            trial.restored, trial.refused = len(before), len(expected) - len(before)
            report = repo.fsck()
            trial.fsck_problems = len(report.problems)
            if trial.refused and report.ok:
                trial.bad.append(f"fsck found nothing although {trial.refused} snapshots failed to restore")
            try:
                gc = repo.gc()
                trial.gc = f"deleted {gc.snapshots_deleted} snapshots, {gc.packs_deleted} packs"
            except qckpt.QckptError as e:
                trial.gc = f"refused: {type(e).__name__}: {str(e)[:120]}"
            after = _restores(repo, {s: expected[s] for s in before}, trial, "after gc")
            lost = before - after
            if lost:
                trial.bad.append(f"gc lost {len(lost)} snapshots that restored before it: {sorted(s[:12] for s in lost)}")
        shutil.rmtree(repo_path / ".index", ignore_errors=True)
        with qckpt.Repository.open(repo_path) as fresh:
            rebuilt = _restores(fresh, expected, trial, "with a rebuilt index")
            if len(rebuilt) < len(expected) and report.ok:
                trial.bad.append(f"{len(expected) - len(rebuilt)} snapshots fail with a rebuilt index, fsck found nothing")
    except Exception as e:  # noqa: BLE001 - the point: any untyped exception is a finding
        trial.bad.append(f"untyped {type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}")
    return trial


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="qckpt-corruption-") as tmp:
        template = Path(tmp) / "template"
        expected = build_template(template)
        trials = []
        for n in range(args.trials):
            kind = KINDS[n % len(KINDS)]
            trial = run_trial(template, expected, kind, Path(tmp), rng)
            trials.append(trial)
            mark = "BAD" if trial.bad else "ok "
            print(f"{n + 1:4d} {mark} {kind:14s} {trial.damage}; restored {trial.restored}/{len(expected)}, "
                  f"fsck problems {trial.fsck_problems}; gc {trial.gc}", flush=True)  # fmt: skip
            for line in trial.bad:
                print(f"     {line}", flush=True)
    bad = [t for t in trials if t.bad]
    results = {
        "trials": len(trials), "snapshots": len(expected), "seconds": time.time() - started,
        "bad": len(bad), "by_kind": dict(Counter(t.kind for t in trials)),
        "restore_refused_trials": sum(1 for t in trials if t.refused), "gc_refused_trials": sum(1 for t in trials if t.gc.startswith("refused")),
        "findings": [asdict(t) for t in bad],
    }  # fmt: skip
    print(f"{len(trials)} trials over {len(KINDS)} kinds of file, {len(expected)} snapshots each: {len(bad)} bad outcomes "
          f"(silent wrong restores, untyped errors, fsck misses, losses after GC)")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    if bad:
        sys.exit(1)
    return results
