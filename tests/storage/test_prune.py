"""Prune: the pure planner against a simple reference model (hypothesis), and the executor."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.storage.conftest import CHUNK, Target
from tests.storage.helpers import read_back, write_full
from vmvault.storage.errors import RepositoryLockedError, StorageError
from vmvault.storage.format import Manifest, new_backup_id
from vmvault.storage.gc import collect_garbage
from vmvault.storage.locks import Lease
from vmvault.storage.prune import PERIODS, KeepPolicy, plan_prune
from vmvault.storage.verify import verify

EPOCH = datetime(2024, 1, 1, tzinfo=UTC)


def _manifest(domain: str, created: datetime) -> Manifest:
    return Manifest(
        backup_id=new_backup_id(created),
        domain=domain,
        parent=None,
        kind="full",
        reason="test",
        checkpoint=None,
        created=created,
        finished=created,
        chunk_size=CHUNK,
        disks=[],
    )


def _reference(policy: KeepPolicy, manifests: list[Manifest]) -> dict[str, set[str]]:
    """Each rule on its own: the newest backup of each of the n most recent periods."""
    reasons: dict[str, set[str]] = {}
    for domain in {m.domain for m in manifests}:
        mine = sorted((m for m in manifests if m.domain == domain), key=lambda m: m.sort_key)
        if policy.last:
            for m in mine[-policy.last :]:
                reasons.setdefault(m.backup_id, set()).add("last")
        for rule, period_of in PERIODS.items():
            n = getattr(policy, rule)
            if not n:
                continue
            newest: dict[str, Manifest] = {}
            for m in mine:
                newest[period_of(m.created)] = m  # later ones overwrite: newest per period
            for period in sorted(newest, key=lambda p: newest[p].sort_key)[-n:]:
                reasons.setdefault(newest[period].backup_id, set()).add(f"{rule} {period}")
    return reasons


counts = st.tuples(*[st.none() | st.integers(1, 4) for _ in range(6)]).filter(
    lambda c: any(v is not None for v in c)
)
backups = st.lists(
    st.tuples(st.sampled_from(["a", "b"]), st.integers(0, 3 * 365 * 24 * 60)),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(counts, backups)
def test_planner_matches_reference(
    rules: tuple[int | None, ...], spec: list[tuple[str, int]]
) -> None:
    policy = KeepPolicy(*rules)
    manifests = [_manifest(d, EPOCH + timedelta(minutes=m)) for d, m in spec]
    plan = plan_prune(policy, manifests)
    expected = _reference(policy, manifests)
    got = {d.manifest.backup_id: set(d.reasons) for d in plan.keep}
    assert got == expected
    assert len(plan.decisions) == len(manifests)
    # Invariants: each domain's newest backup survives; removed ones have no reason.
    for domain in {m.domain for m in manifests}:
        newest = max((m for m in manifests if m.domain == domain), key=lambda m: m.sort_key)
        assert newest.backup_id in got
    assert all(not d.reasons for d in plan.remove)


def test_planner_example_daily_weekly() -> None:
    # Two backups a day for 20 days (02:00 and 14:00, UTC).
    manifests = [
        _manifest("web", EPOCH + timedelta(days=d, hours=h)) for d in range(20) for h in (2, 14)
    ]
    plan = plan_prune(KeepPolicy(last=2, daily=3, weekly=2), manifests)
    kept = {d.manifest.created: d.reasons for d in plan.keep}

    def day(n: int, h: int) -> datetime:
        return EPOCH + timedelta(days=n, hours=h)

    assert kept == {
        day(19, 14): ("last", "daily 2024-01-20", "weekly 2024-W03"),
        day(19, 2): ("last",),
        day(18, 14): ("daily 2024-01-19",),
        day(17, 14): ("daily 2024-01-18",),
        day(13, 14): ("weekly 2024-W02",),  # Sunday 2024-01-14 ends ISO week 2
    }
    assert len(plan.remove) == 40 - 5
    assert plan.to_json()["keep"] == 5


def test_policy_needs_a_rule_and_positive_counts() -> None:
    with pytest.raises(StorageError, match="at least one"):
        KeepPolicy()
    with pytest.raises(StorageError, match="keep-daily must be at least 1"):
        KeepPolicy(daily=0)


def test_execute_removes_backups_and_gc_frees_their_chunks(target: Target) -> None:
    repo = target.init()
    images = [os.urandom(2 * CHUNK) for _ in range(3)]
    made = [write_full(repo, "vm", {"vda": img}) for img in images]
    plan = plan_prune(KeepPolicy(last=1), repo.list_manifests("vm"))
    assert [d.manifest.backup_id for d in plan.remove] == [m.backup_id for m in made[:2]]
    gc_lock = Lease(repo.backend, "exclusive", "gc", 60).acquire()
    try:
        with pytest.raises(RepositoryLockedError, match="exclusive lock for gc"):
            plan.execute(repo)
    finally:
        gc_lock.release()
    assert len(repo.list_manifests()) == 3
    removed = plan.execute(repo)
    assert removed == [m.backup_id for m in made[:2]]
    assert [m.backup_id for m in repo.list_manifests()] == [made[2].backup_id]
    assert list(repo.backend.list(f"backups/vm/{made[0].backup_id}/")) == []
    report = collect_garbage(repo, grace=0)
    assert report.chunks_deleted == 4
    assert read_back(repo, made[2], "vda") == images[2]
    assert verify(repo, read_data=True).ok
