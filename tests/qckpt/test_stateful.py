"""Random repository histories against a plain Python model (Hypothesis stateful testing).

Rules commit, fork, join, tag, delete and garbage-collect; after every step the
refs must match the model and every snapshot the model says is kept must load
bit-exactly. The model computes reachability and retention on its own.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import qckpt
from bench.compare import differences

BRANCHES = st.sampled_from(["main", "a", "b"])
TAGS = st.sampled_from(["t1", "t2"])


def _tree(seed: int, size: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(size, generator=g), "frozen": torch.arange(20.0), "meta": {"seed": seed}}


class RepositoryModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.repo = qckpt.Repository.init(qckpt.MemoryBackend(), chunk_size=64)
        self.trees: dict[str, dict] = {}  # snapshot id -> expected content (stored snapshots only)
        self.parents: dict[str, tuple[str, ...]] = {}
        self.times: dict[str, float] = {}
        self.scores: dict[str, float] = {}
        self.branches: dict[str, str] = {}
        self.tags: dict[str, str] = {}

    def _record(self, snap: qckpt.Snapshot, tree: dict) -> None:
        self.trees[snap.id] = tree
        self.parents[snap.id] = snap.parents
        self.times[snap.id] = snap.time
        self.scores[snap.id] = snap.metrics["score"]

    def _ancestors(self, heads: list[str]) -> list[str]:
        seen, stack = set(), [h for h in heads if h in self.trees]
        while stack:
            s = stack.pop()
            if s not in seen:
                seen.add(s)
                stack.extend(p for p in self.parents[s] if p in self.trees)
        return sorted(seen, key=lambda s: -self.times[s])

    @rule(branch=BRANCHES, seed=st.integers(0, 4), size=st.integers(1, 40))
    def commit(self, branch: str, seed: int, size: int) -> None:
        tree = _tree(seed, size)
        snap = self.repo.commit(tree, branch=branch, metrics={"score": float(seed)})
        assert snap.parents == ((self.branches[branch],) if branch in self.branches else ())
        self._record(snap, tree)
        self.branches[branch] = snap.id

    @precondition(lambda self: self.branches)
    @rule(new=BRANCHES, data=st.data())
    def fork(self, new: str, data: st.DataObject) -> None:
        source = data.draw(st.sampled_from(sorted(self.branches)))
        if new in self.branches:
            try:
                self.repo.create_branch(new, source)
                raise AssertionError("fork onto an existing branch must fail")
            except qckpt.AlreadyExistsError:
                return
        assert self.repo.create_branch(new, source).id == self.branches[source]
        self.branches[new] = self.branches[source]

    @precondition(lambda self: self.branches)
    @rule(into=BRANCHES, data=st.data())
    def join(self, into: str, data: st.DataObject) -> None:
        candidates = data.draw(st.lists(st.sampled_from(sorted(self.branches)), min_size=1, max_size=3, unique=True))
        ids = [self.branches[c] for c in candidates]
        winner = min(ids, key=lambda i: self.scores[i])  # first of equal scores wins
        snap = self.repo.join(into, candidates, metric="score")
        head = self.branches.get(into)
        assert snap.parents == tuple(dict.fromkeys([*([head] if head else []), *ids]))
        self._record(snap, self.trees[winner])
        self.branches[into] = snap.id

    @precondition(lambda self: self.branches)
    @rule(name=TAGS, data=st.data())
    def tag(self, name: str, data: st.DataObject) -> None:
        source = data.draw(st.sampled_from(sorted(self.branches)))
        if name in self.tags:
            self.repo.delete_tag(name)
        self.repo.create_tag(name, source)
        self.tags[name] = self.branches[source]

    @precondition(lambda self: len(self.branches) > 1)
    @rule(data=st.data())
    def delete_branch(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.branches)))
        self.repo.delete_branch(name)
        del self.branches[name]

    @rule(keep_last=st.none() | st.integers(1, 3))
    def gc(self, keep_last: int | None) -> None:
        heads = list(self.branches.values())
        if keep_last is None:
            kept = set(self._ancestors(heads + list(self.tags.values())))
            report = self.repo.gc()
        else:
            kept = {h for h in heads + list(self.tags.values()) if h in self.trees}
            for head in heads:
                kept |= set(self._ancestors([head])[:keep_last])
            report = self.repo.gc(qckpt.RetentionPolicy(keep_last=keep_last))
        assert report.snapshots_kept == len(kept)
        self.trees = {i: t for i, t in self.trees.items() if i in kept}

    @invariant()
    def refs_match(self) -> None:
        assert self.repo.branches() == self.branches
        assert self.repo.tags() == self.tags

    @invariant()
    def every_kept_snapshot_is_exact(self) -> None:
        for snapshot_id, tree in self.trees.items():
            assert differences(self.repo.load(snapshot_id).tree(), tree) == [], snapshot_id

    def teardown(self) -> None:
        assert self.repo.fsck().ok
        self.repo.close()


TestRepositoryModel = RepositoryModel.TestCase
TestRepositoryModel.settings = settings(
    max_examples=40, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
