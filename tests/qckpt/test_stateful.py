"""Random repository histories against a plain Python model (Hypothesis stateful testing).

Rules commit (synchronously and asynchronously), fork, join, average, tag,
delete, restore (and the state's lineage: its next commit continues from the
restored snapshot, or raises if that would move a branch elsewhere), reset,
restore a deleted branch, reopen and garbage-collect; after every step the
refs must match the model and every snapshot the model says is kept must
load bit-exactly. The model computes reachability, retention and the ref
log's protection of rewound snapshots on its own.
Asynchronous commits are settled only after the next operation has run, so
every operation is checked to see the caller's pending commits.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
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


class Holder:
    """A component whose state is a plain tree."""

    def __init__(self) -> None:
        self.tree: dict[str, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        return self.tree

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tree = state_dict


def _content(snapshot_tree: dict) -> dict:
    return snapshot_tree["components"]["holder"]


class SlowRefs(qckpt.MemoryBackend):
    """Branch updates take a little while, so an asynchronous commit is still in flight
    when the next operation starts (the operation must wait for it, not race it)."""

    def swap_ref(self, name: str, expected: str | None, new: str | None) -> None:
        if name.startswith("heads/"):
            time.sleep(0.01)
        super().swap_ref(name, expected, new)


class RepositoryModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.backend = SlowRefs()
        self.repo = qckpt.Repository.init(self.backend, chunk_size=64)
        self.holder = Holder()
        self.state = qckpt.TrainingState(rng=False, holder=self.holder)
        self.trees: dict[str, dict] = {}  # snapshot id -> expected content (stored snapshots only)
        self.parents: dict[str, tuple[str, ...]] = {}
        self.times: dict[str, float] = {}
        self.scores: dict[str, float | None] = {}
        self.branches: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.pending: list[tuple[qckpt.CommitHandle, str, dict]] = []  # async commits not yet settled
        self.origin: str | None = None  # the snapshot the live state came from (None: unknown yet)
        self.restored = False
        self.protected: set[str] = set()  # snapshots rewinding ref changes left (within the grace period)
        self.deleted: dict[str, str] = {}  # deleted branch -> the snapshot it held

    def _record(self, snap: qckpt.Snapshot, tree: dict) -> None:
        self.trees[snap.id] = tree
        self.parents[snap.id] = snap.parents
        self.times[snap.id] = snap.time
        self.scores[snap.id] = snap.metrics.get("score")

    def _settle(self) -> None:
        """Account for the asynchronous commits (all written by now: the operation just run waited)."""
        for handle, branch, tree in self.pending:
            assert handle.done(), "an operation ran without waiting for the caller's pending commits"
            self._committed(handle.wait(), branch, tree)
        self.pending.clear()

    def _committed(self, snap: qckpt.Snapshot, branch: str, tree: dict) -> None:
        parent = self.branches.get(branch, self.origin)
        assert snap.parents == ((parent,) if parent else ())
        self._record(snap, tree)
        self.branches[branch] = snap.id
        self.origin, self.restored = snap.id, False

    def _diverges(self, branch: str) -> bool:
        return self.restored and branch in self.branches and self.branches[branch] != self.origin

    def _ancestors(self, heads: list[str]) -> list[str]:
        seen, stack = set(), [h for h in heads if h in self.trees]
        while stack:
            s = stack.pop()
            if s not in seen:
                seen.add(s)
                stack.extend(p for p in self.parents[s] if p in self.trees)
        return sorted(seen, key=lambda s: -self.times[s])

    def _stage(self, seed: int, size: int) -> dict:
        tree = _tree(seed, size)
        self.holder.tree = _tree(seed, size)  # a separate copy: the repository must not alias it
        self.state.step = seed
        return tree

    @rule(branch=BRANCHES, seed=st.integers(0, 4), size=st.integers(1, 40))
    def commit(self, branch: str, seed: int, size: int) -> None:
        tree = self._stage(seed, size)
        if not self.pending and self._diverges(branch):
            with pytest.raises(qckpt.DivergedError):
                self.repo.commit(self.state, branch=branch, metrics={"score": float(seed)})
            return  # nothing written, the state still comes from the restored snapshot
        snap = self.repo.commit(self.state, branch=branch, metrics={"score": float(seed)})
        self._settle()
        self._committed(snap, branch, tree)

    @rule(branch=BRANCHES, seed=st.integers(0, 4), size=st.integers(1, 40))
    def commit_async(self, branch: str, seed: int, size: int) -> None:
        if self._diverges(branch):  # covered synchronously by ``commit``
            return
        tree = self._stage(seed, size)
        handle = self.repo.commit_async(self.state, branch=branch, metrics={"score": float(seed)})
        self.holder.tree["w"].add_(1.0)  # changing the live state after staging must not change the commit
        self.pending.append((handle, branch, tree))

    def _heads(self) -> dict[str, None]:
        """Branch names including those only pending commits create."""
        return dict.fromkeys([*self.branches, *(branch for _, branch, _ in self.pending)])

    @precondition(lambda self: self.branches or self.pending)
    @rule(new=BRANCHES, data=st.data())
    def fork(self, new: str, data: st.DataObject) -> None:
        source = data.draw(st.sampled_from(sorted(self._heads())))
        exists = new in self._heads()
        try:
            snap = self.repo.create_branch(new, source)
        except qckpt.AlreadyExistsError:
            assert exists, "fork onto a new name must succeed"
            self._settle()
            return
        assert not exists, "fork onto an existing branch must fail"
        self._settle()
        assert snap.id == self.branches[source]
        self.branches[new] = self.branches[source]

    @precondition(lambda self: self.branches or self.pending)
    @rule(into=BRANCHES, data=st.data())
    def join(self, into: str, data: st.DataObject) -> None:
        candidates = data.draw(st.lists(st.sampled_from(sorted(self._heads())), min_size=1, max_size=3, unique=True))
        try:
            snap = self.repo.join(into, candidates, metric="score")
        except qckpt.InvalidInputError:
            self._settle()
            assert any(self.scores[self.branches[c]] is None for c in candidates)
            return
        self._settle()
        ids = [self.branches[c] for c in candidates]
        winner = min(ids, key=lambda i: self.scores[i])  # first of equal scores wins
        head = self.branches.get(into)
        assert snap.parents == tuple(dict.fromkeys([*([head] if head else []), *ids]))
        self._record(snap, self.trees[winner])
        self.branches[into] = snap.id

    @precondition(lambda self: len(self._heads()) > 1)
    @rule(into=BRANCHES, data=st.data())
    def average(self, into: str, data: st.DataObject) -> None:
        first, second = data.draw(st.lists(st.sampled_from(sorted(self._heads())), min_size=2, max_size=2, unique=True))
        try:
            snap = self.repo.average([first, second], branch=into)
        except qckpt.StateMismatchError:
            self._settle()
            a, b = (self.trees[self.branches[n]] for n in (first, second))
            assert a["w"].shape != b["w"].shape
            return
        self._settle()
        a, b = (self.trees[self.branches[n]] for n in (first, second))
        expected = {**a, "w": (0.5 * a["w"].double() + 0.5 * b["w"].double()).float()}
        head = self.branches.get(into)
        assert snap.parents == tuple(dict.fromkeys([*([head] if head else []), self.branches[first], self.branches[second]]))
        self._record(snap, expected)
        self.branches[into] = snap.id

    @precondition(lambda self: self.branches or self.pending)
    @rule(name=TAGS, data=st.data())
    def tag(self, name: str, data: st.DataObject) -> None:
        source = data.draw(st.sampled_from(sorted(self._heads())))
        if name in self.tags:
            self.repo.delete_tag(name)
            self.protected.add(self.tags[name])  # a deleted tag is a rewinding change too
        self.repo.create_tag(name, source)
        self._settle()
        self.tags[name] = self.branches[source]

    @precondition(lambda self: len(self.branches) > 1)
    @rule(data=st.data())
    def delete_branch(self, data: st.DataObject) -> None:
        self.repo.flush()  # deleting a branch a pending commit goes to is the never-lose-history issue's subject
        self._settle()
        name = data.draw(st.sampled_from(sorted(self.branches)))
        self.repo.delete_branch(name)
        self.deleted[name] = self.branches.pop(name)
        self.protected.add(self.deleted[name])

    @precondition(lambda self: self.deleted)
    @rule(data=st.data())
    def restore_branch(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.deleted)))
        self.repo.flush()
        self._settle()
        if name in self.branches:
            with pytest.raises(qckpt.AlreadyExistsError):
                self.repo.restore_branch(name)
            return
        if self.deleted[name] not in self.trees:  # collected: only possible with a zero grace period
            return
        assert self.repo.restore_branch(name).id == self.deleted[name]
        self.branches[name] = self.deleted.pop(name)

    @precondition(lambda self: self.trees)
    @rule(branch=BRANCHES, data=st.data())
    def reset(self, branch: str, data: st.DataObject) -> None:
        self.repo.flush()
        self._settle()
        target = data.draw(st.sampled_from(list(self.trees)))
        old = self.branches.get(branch)
        assert self.repo.reset(branch, target).id == target
        if old is not None and old not in self._ancestors([target]):
            self.protected.add(old)
        self.branches[branch] = target

    @precondition(lambda self: self.trees or self.pending)
    @rule(data=st.data())
    def restore(self, data: st.DataObject) -> None:
        pending = [(h, b) for h, b, _ in self.pending]
        revision = data.draw(st.sampled_from(sorted(self._heads()) + list(self.trees)))
        snap = self.repo.restore(self.state, revision)
        self._settle()
        assert snap.id == self.branches.get(revision, revision), (revision, pending)
        assert differences(self.holder.tree, self.trees[snap.id]) == []
        assert self.state.step == snap.step
        self.origin, self.restored = snap.id, True

    @rule()
    def reopen(self) -> None:
        """A new process's view: a fresh index rebuilt from the packs, an empty hot tier."""
        self.repo.close()  # writes pending commits
        self._settle()
        self.repo = qckpt.Repository.open(self.backend)

    @rule(keep_last=st.none() | st.integers(1, 3), grace=st.booleans())
    def gc(self, keep_last: int | None, grace: bool) -> None:
        policy = qckpt.RetentionPolicy(keep_last=keep_last, reflog_grace=7 * 86400.0 if grace else 0.0)
        report = self.repo.gc(policy)
        self._settle()
        protected = [p for p in self.protected if p in self.trees] if grace else []
        if keep_last is None:
            kept = set(self._ancestors(list(self.branches.values()) + list(self.tags.values()) + protected))
        else:
            heads = list(self.branches.values()) + protected
            kept = {h for h in heads + list(self.tags.values()) if h in self.trees}
            for head in heads:
                kept |= set(self._ancestors([head])[:keep_last])
        assert report.snapshots_kept == len(kept)
        self.trees = {i: t for i, t in self.trees.items() if i in kept}

    @invariant()
    def refs_match(self) -> None:
        if self.pending:  # reading refs would wait for them: leave them in flight for the next rule
            return
        assert self.repo.branches() == self.branches
        assert self.repo.tags() == self.tags

    @invariant()
    def every_kept_snapshot_is_exact(self) -> None:
        if self.pending:
            return
        for snapshot_id, tree in self.trees.items():
            assert differences(_content(self.repo.load(snapshot_id).tree()), tree) == [], snapshot_id

    def teardown(self) -> None:
        assert self.repo.fsck().ok
        self._settle()
        self.repo.close()


TestRepositoryModel = RepositoryModel.TestCase
TestRepositoryModel.settings = settings(
    max_examples=40, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
