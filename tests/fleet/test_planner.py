"""Planning logic: due slots, one catch-up after downtime, spread, per-host limits, priority."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fleet.conftest import make_config
from vmvault.scheduler.planner import (
    PlannedBackup,
    due_slot,
    latest_slot,
    next_slot,
    overdue,
    plan_slot,
    select_ready,
    spread_offset,
)
from vmvault.worker.routing import PRIORITY, queue_for

T0 = datetime(2026, 3, 1, 2, 0, tzinfo=UTC)

times = st.datetimes(
    min_value=datetime(2020, 1, 1), max_value=datetime(2035, 1, 1), timezones=st.just(UTC)
)
crons = st.sampled_from(["0 2 * * *", "*/15 * * * *", "30 */6 * * *", "0 3 * * 0", "5 4 1 * *"])


def test_latest_slot_includes_now() -> None:
    assert latest_slot("0 2 * * *", T0) == T0
    assert latest_slot("0 2 * * *", T0 - timedelta(seconds=1)) == T0 - timedelta(days=1)
    # Found by hypothesis: a microsecond before a slot must not round up into it.
    just_before = datetime(2020, 1, 1, 20, 14, 59, 1, tzinfo=UTC)
    assert latest_slot("*/15 * * * *", just_before) == datetime(2020, 1, 1, 20, 0, tzinfo=UTC)


def test_naive_time_rejected() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        latest_slot("0 2 * * *", datetime(2026, 1, 1))


@settings(max_examples=200, deadline=None)
@given(cron=crons, now=times)
def test_latest_slot_is_newest_slot_not_after_now(cron: str, now: datetime) -> None:
    slot = latest_slot(cron, now)
    assert slot <= now
    assert slot.second == 0
    # No slot lies strictly between it and now: the next slot after it is in the future.
    nxt = latest_slot(cron, slot + timedelta(days=400))
    assert nxt >= slot
    from croniter import croniter

    assert croniter(cron, slot).get_next(datetime) > now


@settings(max_examples=200, deadline=None)
@given(cron=crons, start=times, downtime=st.integers(min_value=0, max_value=90 * 86400))
def test_downtime_gives_exactly_one_catch_up(cron: str, start: datetime, downtime: int) -> None:
    """Whatever was missed, one call plans at most one slot and the next plans nothing."""
    planned = latest_slot(cron, start)
    now = start + timedelta(seconds=downtime)
    slot = due_slot(cron, planned, now)
    if slot is None:
        assert latest_slot(cron, now) == planned
        return
    assert planned < slot <= now
    assert slot == latest_slot(cron, now)
    assert due_slot(cron, slot, now) is None


def test_first_run_plans_newest_slot() -> None:
    assert due_slot("0 2 * * *", None, T0 + timedelta(hours=5)) == T0


@settings(max_examples=300, deadline=None)
@given(
    sched=st.text("abcxyz", min_size=1, max_size=5),
    domain=st.text("abcdef123", min_size=1, max_size=8),
    window=st.integers(min_value=0, max_value=86400),
)
def test_spread_offset_deterministic_and_in_window(sched: str, domain: str, window: int) -> None:
    off = spread_offset(sched, domain, window)
    assert off == spread_offset(sched, domain, window)
    assert 0 <= off < max(window, 1)


def test_spread_covers_the_window(tmp_path: Path) -> None:
    """1000 domains over one hour: no minute gets more than a few times its share."""
    offsets = [spread_offset("nightly", f"vm{i}", 3600) for i in range(1000)]
    per_minute = [0] * 60
    for off in offsets:
        per_minute[off // 60] += 1
    assert max(per_minute) < 3 * 1000 / 60
    assert min(per_minute) > 0


def test_plan_slot_matches_globs_and_spreads(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        schedules={"nightly": {"cron": "0 2 * * *", "domains": ["web*"], "spread_seconds": 600}},
    )
    plan = plan_slot(config, "nightly", T0)
    assert [p.domain for p in sorted(plan, key=lambda p: p.domain)] == ["web1", "web2"]
    assert all(p.host == "hv1" and p.slot == T0 for p in plan)
    assert all(T0 <= p.not_before < T0 + timedelta(seconds=600) for p in plan)
    assert plan == sorted(plan)
    assert len({p.job_id for p in plan}) == 2
    assert plan_slot(config, "nightly", T0) == plan


def test_schedule_spread_defaults_to_scheduler_setting(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        schedules={"all": {"cron": "0 2 * * *", "domains": ["*"]}},
        scheduler={"spread_seconds": 0},
    )
    assert {p.not_before for p in plan_slot(config, "all", T0)} == {T0}


def _job(domain: str, host: str, offset: int = 0, sched: str = "s") -> PlannedBackup:
    return PlannedBackup(T0 + timedelta(seconds=offset), domain, host, sched, T0)


@settings(max_examples=300, deadline=None)
@given(
    jobs=st.lists(
        st.tuples(
            st.sampled_from(["d1", "d2", "d3", "d4", "d5", "d6"]),
            st.sampled_from(["h1", "h2", "h3"]),
            st.integers(min_value=0, max_value=100),
        ),
        max_size=20,
    ),
    limits=st.dictionaries(st.sampled_from(["h1", "h2", "h3"]), st.integers(1, 4)),
    busy=st.dictionaries(st.sampled_from(["h1", "h2", "h3"]), st.integers(0, 5)),
    at=st.integers(min_value=0, max_value=120),
)
def test_select_ready_respects_limits(
    jobs: list[tuple[str, str, int]],
    limits: dict[str, int],
    busy: dict[str, int],
    at: int,
) -> None:
    # A domain lives on one host: derive the host from the domain's first job.
    home: dict[str, str] = {}
    pending = [_job(d, home.setdefault(d, h), off) for d, h, off in jobs]
    now = T0 + timedelta(seconds=at)
    chosen = select_ready(pending, now, busy, limits)
    assert all(job.not_before <= now for job in chosen)
    assert len({job.domain for job in chosen}) == len(chosen)
    for host in ("h1", "h2", "h3"):
        got = sum(1 for job in chosen if job.host == host)
        room = max(limits.get(host, 1) - busy.get(host, 0), 0)
        assert got <= room
        # Work-conserving: if fewer than room were chosen, no eligible job was left out.
        eligible = {j.domain for j in pending if j.host == host and j.not_before <= now}
        assert got == min(room, len(eligible))


def test_select_ready_takes_earliest_first() -> None:
    pending = [_job("late", "h1", 50), _job("early", "h1", 10)]
    chosen = select_ready(pending, T0 + timedelta(seconds=60), {}, {"h1": 1})
    assert [j.domain for j in chosen] == ["early"]


def test_restores_ahead_of_backups_and_routing() -> None:
    assert PRIORITY["restore"] < PRIORITY["backup"] < PRIORITY["gc"]
    assert queue_for("backup", "hv1") == "host.hv1"
    assert queue_for("restore", "hv2") == "host.hv2"
    assert queue_for("gc", None) == queue_for("verify", "hv1") == "storage"
    with pytest.raises(ValueError, match="host"):
        queue_for("backup", None)


def test_overdue_gives_one_slot_of_grace() -> None:
    now = T0 + timedelta(hours=3)
    assert not overdue("0 2 * * *", T0 + timedelta(minutes=20), now)
    assert not overdue("0 2 * * *", T0 - timedelta(hours=20), now)  # yesterday's: still ok
    assert overdue("0 2 * * *", T0 - timedelta(days=2), now)
    assert overdue("0 2 * * *", None, now)


def test_claims_outlive_their_slot_even_for_monthly_schedules() -> None:
    from vmvault.scheduler.scheduler_loop import CLAIM_MARGIN, claim_ttl

    monthly = datetime(2026, 3, 1, 2, 0, tzinfo=UTC)
    assert next_slot("0 2 1 * *", monthly) == datetime(2026, 4, 1, 2, 0, tzinfo=UTC)
    # Planned on the 1st: the claim must still exist on the 31st, when a new leader with
    # an empty memory plans the same (newest) slot again.
    ttl = claim_ttl("0 2 1 * *", monthly, monthly + timedelta(seconds=5))
    assert ttl >= 31 * 86400 - 5 + CLAIM_MARGIN - 1
    assert claim_ttl("*/15 * * * *", T0, T0) == 15 * 60 + CLAIM_MARGIN


@pytest.mark.parametrize("cron", ["*/10 * * * *", "0 2,3 * * *", "0 2 * * *"])
def test_spread_never_reaches_past_the_next_slot(tmp_path: Path, cron: str) -> None:
    """A start offset past the next slot would never be released: the next slot replaces
    the plan first, and the offset is the same every slot, so the domain never runs."""
    config = make_config(
        tmp_path,
        schedules={"often": {"cron": cron, "domains": ["*"], "spread_seconds": 1800}},
    )
    slot = latest_slot(cron, T0)
    plan = plan_slot(config, "often", slot)
    assert len(plan) == 3
    nxt = next_slot(cron, slot)
    # Half the gap at most: ticks are discrete, and a late start still lands in its slot.
    assert all(job.not_before < slot + (nxt - slot) / 2 for job in plan), plan
    if nxt - slot >= timedelta(hours=1):
        # Long intervals keep the configured window (offsets 811, 1307, 1249 s).
        assert max(job.not_before for job in plan) - slot > timedelta(seconds=1200)
