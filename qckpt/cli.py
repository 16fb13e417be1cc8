"""The ``qckpt`` command line.

Exit codes: 0 success; 1 damage found (fsck) or stored data failed verification;
2 invalid usage or input; 3 repository, revision or ref not found; 4 conflict
(exists already, or a ref moved concurrently).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import sys
import time
from pathlib import Path
from collections.abc import Callable, Sequence
from dataclasses import asdict, fields, is_dataclass
from typing import Any

from qckpt import __version__
from qckpt._progress import stage_progress
from qckpt.errors import ConflictError, IntegrityError, InvalidInputError, NotFoundError, QckptError
from qckpt.format.records import Snapshot
from qckpt.ops.file_export import FORMATS, format_for
from qckpt.ops.gc import RetentionPolicy
from qckpt.repository import Repository
from qckpt.store.layout import BRANCH_PREFIX

EXIT_DAMAGED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_CONFLICT, EXIT_UNAVAILABLE = 1, 2, 3, 4, 5
#: Entry points in this group add commands: each is called with ``command(name, fn,
#: help) -> ArgumentParser`` and registers its own; ``fn(args, repo)`` returns the exit code.
PLUGIN_GROUP = "qckpt.cli"


def _plain(o: Any) -> Any:
    """JSON for dataclasses (public fields only) and anything else json cannot encode."""
    if is_dataclass(o) and not isinstance(o, type):
        return {f.name: getattr(o, f.name) for f in fields(o) if not f.name.startswith("_")}
    return str(o)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=1, default=_plain))


def _short(snapshot_id: str | None) -> str:
    return snapshot_id[:12] if snapshot_id else "(none)"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _decorations(repo: Repository) -> dict[str, list[str]]:
    names: dict[str, list[str]] = {}
    for name, target in repo.branches().items():
        names.setdefault(target, []).append(name)
    for name, target in repo.tags().items():
        names.setdefault(target, []).append(f"tag: {name}")
    return names


def _summary(snap: Snapshot, names: dict[str, list[str]]) -> str:
    refs = f" ({', '.join(names[snap.id])})" if snap.id in names else ""
    metrics = " ".join(f"{k}={v:.4g}" for k, v in snap.metrics.items())
    step = f" step {snap.step}" if snap.step is not None else ""
    lossy = f" [lossy: {snap.lossy.get('mantissa_bits')} mantissa bits]" if snap.lossy else ""
    message = f"  {snap.message}" if snap.message else ""
    return f"{snap.short_id}{refs}{step}{lossy} {metrics}{message}".rstrip()


def _graph_lines(snaps: list[Snapshot], names: dict[str, list[str]]) -> list[str]:
    """One line per snapshot, newest first, with a lane per line of history: a join
    (several parents) opens a lane to the right of its own (``|\\``), and a lane whose
    parent already waits in another lane (a fork point) folds into it (``|/``)."""
    lanes: list[str] = []  # the snapshot each lane waits for
    lines = []
    for snap in snaps:
        col = lanes.index(snap.id) if snap.id in lanes else len(lanes)
        if col == len(lanes):
            lanes.append(snap.id)
        lines.append(" ".join("*" if i == col else "|" for i in range(len(lanes))) + "  " + _summary(snap, names))
        first, *others = snap.parents or [None]
        opened = [p for p in dict.fromkeys(others) if p not in lanes and p != first]
        at = col + 1  # where lanes for further parents open
        if first is not None and first not in lanes[:col] + lanes[col + 1 :]:
            lanes[col] = first
        else:  # a root ends its lane; a fork point's lane folds into the one that continues
            into = lanes.index(first) if first is not None else None
            width = len(lanes)
            lanes.pop(col)
            at = col
            if into is not None:
                lines.append(_row(width, col, [(2 * col - 1, "/")] if into < col else
                                  [(2 * col, "|")], [(2 * k - 1, "/") for k in range(col + 1, width)]))  # fmt: skip
        if opened:
            lanes[at:at] = opened
            width = len(lanes)
            lines.append(_row(width, at, [(2 * at - 1 + 2 * i, "\\") for i in range(len(opened))],
                              [(2 * k + 1, "\\") for k in range(at, width - len(opened))]))  # fmt: skip
    return lines


def _row(width: int, straight: int, *marks: list[tuple[int, str]]) -> str:
    """A connector line between two graph lines: ``|`` for the first ``straight``
    lanes (they go on unchanged), then the ``(column, character)`` marks."""
    cells = [" "] * (2 * width + 1)
    for k in range(straight):
        cells[2 * k] = "|"
    for column, char in (m for group in marks for m in group):
        cells[column] = char
    return "".join(cells).rstrip()


def cmd_init(args: argparse.Namespace) -> int:
    repo = Repository.init(args.path or args.repo, chunk_size=args.chunk_size, compression_level=args.compression_level,
                           max_chain=args.max_chain, endpoint_url=args.endpoint_url)  # fmt: skip
    print(f"initialized empty qckpt repository at {repo.backend.uri}")
    repo.close()
    return 0


def _deleted_branches(repo: Repository) -> list[str]:
    """Branches whose deletion the ref log records."""
    return sorted({e.ref.removeprefix(BRANCH_PREFIX) for e in repo.reflog() if e.ref.startswith(BRANCH_PREFIX) and e.new is None})


def _no_branches(repo: Repository) -> str:
    """What to tell someone who lists the branches of a repository that has none."""
    deleted = _deleted_branches(repo)
    if deleted:
        return f"no branches; deleted: {', '.join(deleted)} (`qckpt branch --restore NAME` brings one back)"
    return "no branches yet: the first commit creates one"


def cmd_log(args: argparse.Namespace, repo: Repository) -> int:
    branches = repo.branches()
    revisions = list(args.revisions) or (sorted(branches) if args.all or args.graph or "main" not in branches else ["main"])
    snaps = repo.log(*revisions, limit=args.n) if revisions else []
    if not revisions:
        print(_no_branches(repo), file=sys.stderr)
    if args.json:
        _print_json(snaps)
        return 0
    names = _decorations(repo)
    for line in _graph_lines(snaps, names) if args.graph else (_summary(s, names) for s in snaps):
        print(line)
    return 0


def cmd_show(args: argparse.Namespace, repo: Repository) -> int:
    view = repo.load(args.revision)
    snap, manifest, owner = view.snapshot, repo.manifest(view.snapshot), view.parameter_of()
    if args.json:
        _print_json({"snapshot": snap, "tensors": [{"path": t.path, "dtype": t.dtype, "shape": t.shape,
                     "bytes": t.nbytes, "chunks": len(t.chunks), "parameter": owner.get(t.path)}
                    for t in manifest.tensors]})  # fmt: skip
        return 0
    print(f"snapshot  {snap.id}\nmanifest  {snap.manifest}\nparents   {' '.join(snap.parents) or '-'}")
    print(f"step      {snap.step}\ntime      {_when(snap.time)}\nmessage   {snap.message}")
    print(f"metrics   {json.dumps(snap.metrics)}")
    print(f"size      {_size(snap.stats.raw_bytes)} in {snap.stats.chunks} chunks; "
          f"this commit wrote {_size(snap.stats.new_stored_bytes)} ({'; '.join((f'{snap.stats.new_chunks} new chunks', *snap.stats.notes))})")  # fmt: skip
    if snap.annotations:
        print(f"notes     {json.dumps(snap.annotations)}")
    print(f"\n{len(manifest.tensors)} tensors:")
    for t in manifest.tensors:
        of = f"  of {owner[t.path]}" if t.path in owner else ""
        print(f"  {t.path:60s} {t.dtype:10s} {str(list(t.shape)):18s} {_size(t.nbytes):>10s}{of}")
    return 0


def _refs(args: argparse.Namespace, repo: Repository, kind: str) -> int:
    create, delete, listing = (
        (repo.create_branch, repo.delete_branch, repo.branches)
        if kind == "branch"
        else (repo.create_tag, repo.delete_tag, repo.tags)
    )
    if getattr(args, "restore", None):
        snap = repo.restore_branch(args.restore)
        print(f"restored branch {args.restore} at {snap.short_id} (step {snap.step}), from the ref log")
    elif args.delete:
        held = (listing().get(args.delete) or "")[:12]
        delete(args.delete)
        undo = f"qckpt branch --restore {args.delete}" if kind == "branch" else f"qckpt tag {args.delete} --at {held}"
        print(f"deleted {kind} {args.delete} (it was at {held}); `{undo}` brings it back, and gc keeps "
              f"its snapshots for the ref log's grace period (default 7 days)")
    elif args.name is not None:
        snap = create(args.name, args.at)
        print(f"created {kind} {args.name} at {snap.short_id} (step {snap.step})")
    elif args.json:
        _print_json(listing())
    elif refs := listing():
        for name, target in refs.items():
            print(f"{name:30s} {target[:12]}")
    else:
        print(_no_branches(repo) if kind == "branch" else "no tags yet: `qckpt tag NAME [--at REV]` creates one", file=sys.stderr)
    return 0


def cmd_fork(args: argparse.Namespace, repo: Repository) -> int:
    snap = repo.create_branch(args.name, args.at)
    print(f"forked {args.name} from {args.at} at {snap.short_id} (step {snap.step}); no data copied")
    return 0


def cmd_diff(args: argparse.Namespace, repo: Repository) -> int:
    diffs = repo.diff(args.a, args.b)
    if args.json:
        _print_json(diffs)
        return 0
    shown = [d for d in diffs if args.all or d.status != "same"]
    print(f"{'path':60s} {'status':8s} {'l2':>11s} {'relative':>10s} {'cosine':>9s}")
    for d in shown:
        nums = [f"{v:11.4g}" if v is not None else f"{'-':>11s}" for v in (d.l2, d.relative, d.cosine)]
        print(f"{d.path:60s} {d.status:8s} {nums[0]} {nums[1][1:]} {nums[2][2:]}")
    same = sum(d.status == "same" for d in diffs)
    print(f"\n{len(diffs) - same} of {len(diffs)} tensors differ")
    return 0


def cmd_du(args: argparse.Namespace, repo: Repository) -> int:
    stats = repo.stats()
    usage = dict(sorted(repo.usage().items()))
    if args.json:
        _print_json({"repository": {**asdict(stats), "dedup_ratio": stats.dedup_ratio,
                                    "compression_ratio": stats.compression_ratio}, "branches": usage})  # fmt: skip
        return 0
    print(f"repository: {stats.snapshots} snapshots, {stats.packs} packs, raw {_size(stats.raw_bytes)}, "
          f"stored {_size(stats.stored_bytes)} (dedup {stats.dedup_ratio:.2f}x, overall {stats.compression_ratio:.2f}x), "
          f"warm copies of branch heads {_size(stats.warm_bytes)}")  # fmt: skip
    print(f"\n{'branch':24s} {'snapshots':>9s} {'raw':>12s} {'exclusive':>12s} {'objects':>8s}")
    for name, u in usage.items():
        print(f"{name:24s} {u.snapshots:9d} {_size(u.raw_bytes):>12s} {_size(u.exclusive_bytes):>12s} {u.exclusive_objects:8d}")
    print("\n'exclusive': stored objects no other branch or tag needs, i.e. what deleting the branch frees\n"
          "(GC frees it once the ref log's grace period has passed; see qckpt gc --reflog-grace).")
    return 0


_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhdw]?)")


def _at_least_one(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise InvalidInputError(f"invalid duration {text!r}: use e.g. 3600, 90m, 12h, 7d, 2w")
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
    return float(match.group(1)) * unit


def _policy(args: argparse.Namespace) -> RetentionPolicy:
    best: dict[str, Any] = {}
    if args.keep_best:
        parts = args.keep_best.split(":")
        if (not 1 <= len(parts) <= 3 or not parts[0] or (len(parts) > 1 and not (parts[1].isdigit() and int(parts[1]) >= 1))
                or (len(parts) > 2 and parts[2] not in ("min", "max"))):  # fmt: skip
            raise InvalidInputError(f"invalid --keep-best {args.keep_best!r}: use METRIC[:K[:min|max]], K at least 1")
        best = {"keep_best": parts[0], "keep_best_k": int(parts[1]) if len(parts) > 1 else 1,
                "keep_best_mode": parts[2] if len(parts) > 2 else "min"}  # fmt: skip
    newer = _seconds(args.keep_newer_than) if args.keep_newer_than else None
    grace = {"reflog_grace": _seconds(args.reflog_grace)} if args.reflog_grace else {}
    return RetentionPolicy(keep_last=args.keep_last, keep_newer_than=newer, keep_tagged=not args.no_keep_tagged,
                           **best, **grace)  # fmt: skip


CONFIRM_SHARE = 0.5  # a collection that would expire more of the history than this asks first


def _confirm_expiry(args: argparse.Namespace, repo: Repository, policy: RetentionPolicy) -> bool:
    """Whether to go ahead: a policy that would expire more than ``CONFIRM_SHARE`` of
    all snapshots lists them and needs ``--yes`` (or a "y" at a terminal)."""
    plan = repo.gc(policy, dry_run=True)
    total = plan.snapshots_kept + plan.snapshots_deleted
    if args.yes or not total or plan.snapshots_deleted / total <= CONFIRM_SHARE:
        return True
    print(f"this would delete {plan.snapshots_deleted} of {total} snapshots:", file=sys.stderr)
    for snap in plan.expired[:20]:
        print(f"  {snap.short_id}  step {snap.step}  {_when(snap.time)}  {snap.message}", file=sys.stderr)
    if len(plan.expired) > 20:
        print(f"  ... and {len(plan.expired) - 20} more", file=sys.stderr)
    if sys.stdin is not None and sys.stdin.isatty():
        return input("delete them? [y/N] ").strip().lower() in ("y", "yes")
    print("qckpt: refusing without --yes (or run with --dry-run to look first)", file=sys.stderr)
    return False


def cmd_gc(args: argparse.Namespace, repo: Repository) -> int:
    policy = _policy(args)
    if not args.dry_run and not _confirm_expiry(args, repo, policy):
        return EXIT_USAGE
    report = repo.gc(policy, dry_run=args.dry_run, progress=stage_progress(not args.json))
    if args.json:
        _print_json(report)
        return 0
    freed = report.bytes_before - report.bytes_after
    if report.dry_run:
        print(f"would keep {report.snapshots_kept} snapshots and delete {report.snapshots_deleted} snapshots, "
              f"{report.manifests_deleted} manifests, {report.chunks_deleted} chunks, {report.packs_deleted} packs and "
              f"{report.warm_copies_deleted} stale warm copies, and would repack {report.packs_repacked} packs")  # fmt: skip
        print(f"size would go from {_size(report.bytes_before)} to {_size(report.bytes_after)} "
              f"(would free {_size(freed)}); nothing was deleted (dry run)")  # fmt: skip
    else:
        print(f"kept {report.snapshots_kept} snapshots; deleted {report.snapshots_deleted} snapshots, "
              f"{report.manifests_deleted} manifests, {report.chunks_deleted} chunks, {report.packs_deleted} packs and "
              f"{report.warm_copies_deleted} stale warm copies; repacked {report.packs_repacked} packs")  # fmt: skip
        print(f"size {_size(report.bytes_before)} -> {_size(report.bytes_after)} (freed {_size(freed)})")
    return 0


def cmd_reset(args: argparse.Namespace, repo: Repository) -> int:
    branches = repo.branches()
    old = branches.get(args.branch)
    if old is None:  # a misspelt name would otherwise become a new branch, and the branch meant stay where it was
        listed = f"branches: {', '.join(sorted(branches))}" if branches else "no branches"
        restore = f"; it was deleted: `qckpt branch --restore {args.branch}` brings it back" if args.branch in _deleted_branches(repo) else ""
        raise NotFoundError(f"no branch named {args.branch!r} to move ({listed}); `qckpt branch {args.branch} --at "
                            f"{args.revision}` creates one{restore}")  # fmt: skip
    snap = repo.reset(args.branch, args.revision)
    print(f"branch {args.branch}: {_short(old)} -> {snap.short_id} (step {snap.step}); "
          "recorded in the ref log (qckpt reflog)")  # fmt: skip
    return 0


def cmd_reflog(args: argparse.Namespace, repo: Repository) -> int:
    entries = repo.reflog(args.name, limit=args.n)
    if args.name is not None and not entries:
        raise NotFoundError(f"no branch or tag named {args.name!r} has a recorded change (`qckpt reflog` lists them all)")
    if args.json:
        _print_json(entries)
        return 0
    for e in entries:
        mark = "  (left its old snapshot behind)" if e.rewinds else ""
        print(f"{_when(e.time)}  {e.ref:24s} {_short(e.old):12s} -> {_short(e.new):12s}  {e.cause}{mark}")
    return 0


def cmd_fsck(args: argparse.Namespace, repo: Repository) -> int:
    report = repo.fsck(progress=stage_progress(not args.json))
    if args.json:
        _print_json({**asdict(report), "ok": report.ok})
    else:
        print(f"checked {report.refs} refs, {report.snapshots} snapshots, {report.chunks} chunks, {report.packs} packs, "
              f"{report.warm_copies} warm copies")
        for p in report.problems:
            print(f"DAMAGED {p.subject}: {p.error}")
            for a in p.affects:
                print(f"    affects {a}")
        print("no problems found" if report.ok else f"{len(report.problems)} problems found")
    return 0 if report.ok else EXIT_DAMAGED


def cmd_export(args: argparse.Namespace, repo: Repository) -> int:
    count = repo.export(args.revision, args.dest, args.format, progress=stage_progress())
    kind = {"zarr": "a zarr v3 directory", "torch": "a torch.save file", "safetensors": "a safetensors file"}
    print(f"exported {count} tensors of {args.revision} to {args.dest} ({kind[format_for(Path(args.dest), args.format)]})")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qckpt",
        description="Inspect and maintain qckpt checkpoint repositories.",
        epilog="exit status: 0 success, 1 damage found, 2 invalid usage or input, 3 not found, "
        "4 conflict (exists already, or a ref moved), 5 the storage could not be used (or needs a newer qckpt)",
    )
    parser.add_argument("-R", "--repo", default=os.environ.get("QCKPT_REPO", "."),
                        help="repository path or file:// URI (default: $QCKPT_REPO or .)")  # fmt: skip
    parser.add_argument("--endpoint-url", default=None,
                        help="S3-compatible server for s3:// repositories (default: AWS_ENDPOINT_URL or AWS's own)")
    parser.add_argument("--version", action="version", version=f"qckpt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.set_defaults(parsers=sub.choices)  # the command parsers by name, for errors in their own terms

    def command(name: str, fn: Callable[..., int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(fn=fn)
        return p

    p = command("init", cmd_init, "create an empty repository")
    p.add_argument("path", nargs="?", help="where (default: --repo)")
    p.add_argument("--chunk-size", type=int, default=1 << 20)
    p.add_argument("--compression-level", type=int, default=1)
    p.add_argument("--max-chain", type=int, default=16, help="longest delta chain a restore decodes (1: no deltas)")
    p = command("log", cmd_log, "list snapshots, newest first")
    p.add_argument("revisions", nargs="*", help="start points (default: main; --all: every branch)")
    p.add_argument("--all", action="store_true", help="history of every branch")
    p.add_argument("--graph", action="store_true", help="draw lines of history (implies --all without revisions)")
    p.add_argument("-n", type=_at_least_one, help="at most N snapshots")
    p = command("show", cmd_show, "show one snapshot and its tensors")
    p.add_argument("revision")
    for kind in ("branch", "tag"):
        plural = {"branch": "branches", "tag": "tags"}[kind]
        p = command(kind, lambda a, r, k=kind: _refs(a, r, k), f"list, create (NAME [--at REV]) or delete (-d NAME) {plural}")
        p.add_argument("name", nargs="?")
        p.add_argument("--at", default="main", help="revision to point at (default: main)")
        p.add_argument("-d", "--delete", metavar="NAME")
    sub.choices["branch"].add_argument("--restore", metavar="NAME", help="re-create a deleted branch from the ref log")
    p = command("reset", cmd_reset, "move an existing branch to any revision (recorded in the ref log)")
    p.add_argument("branch")
    p.add_argument("revision")
    p = command("reflog", cmd_reflog, "every recorded change of branches and tags, newest first")
    p.add_argument("name", nargs="?", help="one branch or tag (default: all)")
    p.add_argument("-n", type=_at_least_one, help="at most N entries")
    p = command("fork", cmd_fork, "start a branch at any revision (metadata only, no data copied)")
    p.add_argument("name")
    p.add_argument("--at", default="main", help="branch, tag, id, BRANCH@STEP or BRANCH~N (default: main)")
    p = command("diff", cmd_diff, "compare two snapshots tensor by tensor")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--all", action="store_true", help="also list identical tensors")
    command("du", cmd_du, "raw versus stored bytes, dedup and compression ratios per branch")
    p = command("gc", cmd_gc, "expire snapshots by policy and delete unreferenced data")
    p.add_argument("--keep-last", type=int, metavar="N", help="keep the newest N snapshots of each branch")
    p.add_argument("--keep-best", metavar="METRIC[:K[:min|max]]", help="keep the K best snapshots by a metric")
    p.add_argument("--keep-newer-than", metavar="AGE", help="keep snapshots newer than AGE (3600, 90m, 12h, 7d)")
    p.add_argument("--no-keep-tagged", action="store_true", help="let tagged snapshots expire too")
    p.add_argument("--reflog-grace", metavar="AGE",
                   help="how long snapshots left by a reset or a deleted branch stay protected (default 7d; 0: not at all)")
    p.add_argument("--dry-run", action="store_true", help="report what would be deleted, delete nothing")
    p.add_argument("--yes", action="store_true", help=f"do not ask before expiring more than {CONFIRM_SHARE:.0%} of the snapshots")
    command("fsck", cmd_fsck, "verify every reachable object; exit 1 if anything is damaged")
    p = command("export", cmd_export, "write a snapshot to a zarr v3 directory, a torch.save file or a safetensors file")
    p.add_argument("revision")
    p.add_argument("dest", help="where (must not exist); .pt/.pth: torch.save, .safetensors: safetensors, else zarr")
    p.add_argument("--format", choices=FORMATS, help="override what DEST's suffix says")
    for name in ("log", "show", "branch", "tag", "diff", "du", "gc", "fsck", "reflog"):
        sub.choices[name].add_argument("--json", action="store_true", help="machine-readable output")
    for plugin in importlib.metadata.entry_points(group=PLUGIN_GROUP):  # e.g. "cone", from the branching engine
        plugin.load()(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = _parser().parse_known_args(argv)
    if extra:  # reported by the command's own parser, whose usage says what it takes
        args.parsers[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.fn is cmd_init:
            return cmd_init(args)
        with Repository.open(args.repo, endpoint_url=args.endpoint_url) as repo:
            return int(args.fn(args, repo))
    except NotFoundError as e:
        code, error = EXIT_NOT_FOUND, e
    except InvalidInputError as e:
        code, error = EXIT_USAGE, e
    except ConflictError as e:
        code, error = EXIT_CONFLICT, e
    except IntegrityError as e:
        code, error = EXIT_DAMAGED, e
    except QckptError as e:  # the storage failed or is unreachable, or a newer format: not damage
        code, error = EXIT_UNAVAILABLE, e
    print(f"qckpt: error: {error}", file=sys.stderr)
    return code


def entry_point() -> None:
    """Console script entry: exit with ``main``'s code (quietly when the reader of
    the output went away, as ``qckpt log | head`` does)."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        code = 141  # 128 + SIGPIPE, as shells report it
    sys.exit(code)


if __name__ == "__main__":
    entry_point()
