"""Retention: a pure planner ``plan_prune(policy, manifests) -> PrunePlan`` and its executor.

Semantics are restic's ``forget --keep-*`` (also what Proxmox Backup Server documents):
per domain, backups are walked newest first; each rule ``keep_<period> = n`` keeps the
newest backup of each of the ``n`` most recent periods that have a backup (``keep_last``:
the ``n`` newest backups). The rules apply together: a backup kept by any rule stays, and
each survivor lists every rule that keeps it. Periods are computed in UTC.

A damaged manifest (``DamagedManifest``: present, unreadable) is neither kept nor
removed: the plan lists it apart and leaves it in place for the operator. It never
takes a "keep" slot, which would let prune remove an intact backup in its stead.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import TYPE_CHECKING, Any

from vmvault.storage.errors import StorageError
from vmvault.storage.format import DamagedManifest, Manifest, iso
from vmvault.storage.progress import Progress

if TYPE_CHECKING:
    from vmvault.storage.repository import Repository


@dataclass(frozen=True)
class KeepPolicy:
    """How many backups each rule keeps; None = rule unused. At least one rule is required.

    The fleet config and queued prune jobs spell the rules ``keep_<rule>`` (``keep_daily:
    7``); :meth:`from_rules` takes either spelling, :func:`rule_name` maps one to the other.
    """

    last: int | None = None
    hourly: int | None = None
    daily: int | None = None
    weekly: int | None = None
    monthly: int | None = None
    yearly: int | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and value < 1:
                raise StorageError(f"keep-{f.name} must be at least 1, got {value}")
        if self.empty:
            raise StorageError("a retention policy needs at least one --keep-* rule")

    @property
    def empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))

    def to_json(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name)}

    @classmethod
    def from_rules(cls, rules: Mapping[str, int]) -> KeepPolicy:
        """The policy of ``{rule: count}``, rules spelled ``daily`` or ``keep_daily``."""
        return cls(**{rule_name(key): count for key, count in rules.items()})


# The rules, in the order they are listed and applied (restic / Proxmox Backup Server).
KEEP_RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")
KEEP_PREFIX = "keep_"


def rule_name(key: str) -> str:
    """``daily`` for ``keep_daily`` (the config's spelling) or ``daily``."""
    return key.removeprefix(KEEP_PREFIX)


def _week(t: datetime) -> str:
    year, week, _ = t.isocalendar()
    return f"{year}-W{week:02d}"


# Rule name -> the period a timestamp falls in. "last" is handled by position.
PERIODS: dict[str, Callable[[datetime], str]] = {
    "hourly": lambda t: t.strftime("%Y-%m-%d %H"),
    "daily": lambda t: t.strftime("%Y-%m-%d"),
    "weekly": _week,
    "monthly": lambda t: t.strftime("%Y-%m"),
    "yearly": lambda t: t.strftime("%Y"),
}


@dataclass(frozen=True)
class PruneDecision:
    """One backup's fate and, when kept, every rule that keeps it (e.g. ``daily 2026-11-25``)."""

    manifest: Manifest
    keep: bool
    reasons: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "backup_id": self.manifest.backup_id,
            "domain": self.manifest.domain,
            "created": iso(self.manifest.created),
            "action": "keep" if self.keep else "remove",
            "reasons": list(self.reasons),
        }


@dataclass(frozen=True)
class PrunePlan:
    """What a prune would do; ``execute`` does it."""

    policy: KeepPolicy
    decisions: list[PruneDecision]
    damaged: list[DamagedManifest] = field(default_factory=list)  # left alone

    @property
    def keep(self) -> list[PruneDecision]:
        return [d for d in self.decisions if d.keep]

    @property
    def remove(self) -> list[PruneDecision]:
        return [d for d in self.decisions if not d.keep]

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": self.policy.to_json(),
            "keep": len(self.keep),
            "remove": len(self.remove),
            "backups": [d.to_json() for d in self.decisions],
            "damaged": [d.to_json() for d in self.damaged],
        }

    def execute(self, repo: Any, progress: Progress | None = None) -> list[str]:
        """Delete the manifests (then indexes) of the removed backups; chunks are left to GC.

        Deleting a manifest first means a crash halfway leaves only unreferenced
        indexes, which GC removes; no surviving backup is ever touched. Runs under a
        shared lock: alongside backups, never while GC marks (GC would otherwise see a
        manifest whose indexes vanish under it and stop).
        """
        from vmvault.storage.locks import Lease

        removed: list[str] = []
        todo = self.remove
        if not todo:
            return removed
        lease = Lease(repo.backend, "shared", "prune", repo.lease_ttl).acquire()
        try:
            for n, d in enumerate(todo, 1):
                repo.delete_backup(d.manifest)
                removed.append(d.manifest.backup_id)
                if progress:
                    progress("prune", n, len(todo))
        finally:
            lease.release()
        return removed


def plan_prune(
    policy: KeepPolicy,
    manifests: list[Manifest],
    damaged: Sequence[DamagedManifest] = (),
) -> PrunePlan:
    """Decide which backups to keep; pure (no I/O), deterministic, per domain.

    ``damaged`` manifests are only carried into the plan, to be shown: never kept,
    never removed.
    """
    by_domain: dict[str, list[Manifest]] = defaultdict(list)
    for m in manifests:
        by_domain[m.domain].append(m)
    decisions: list[PruneDecision] = []
    for domain in sorted(by_domain):
        newest_first = sorted(by_domain[domain], key=lambda m: m.sort_key, reverse=True)
        reasons: dict[str, list[str]] = defaultdict(list)
        if policy.last:
            for m in newest_first[: policy.last]:
                reasons[m.backup_id].append("last")
        for rule, period_of in PERIODS.items():
            budget = getattr(policy, rule)
            if not budget:
                continue
            last_period: str | None = None
            for m in newest_first:
                if budget == 0:
                    break
                period = period_of(m.created)
                # Newest first, so the first backup seen in a period is its newest.
                if period != last_period:
                    reasons[m.backup_id].append(f"{rule} {period}")
                    last_period = period
                    budget -= 1
        for m in reversed(newest_first):  # report oldest first, like `list`
            why = tuple(reasons.get(m.backup_id, ()))
            decisions.append(PruneDecision(m, bool(why), why))
    return PrunePlan(policy, decisions, list(damaged))


def plan_repository_prune(
    repo: Repository, rules: Mapping[str, int], domains: Sequence[str] | None = None
) -> PrunePlan:
    """``plan_prune`` over what ``repo`` holds for ``domains`` (every domain when None).

    Damaged manifests are planned too: neither kept nor removed, but named in the plan,
    as `vmvault prune` names them.
    """
    scans = [repo.scan_manifests(d) for d in (domains if domains is not None else [None])]
    return plan_prune(
        KeepPolicy.from_rules(rules),
        [m for scan in scans for m in scan.manifests],
        [d for scan in scans for d in scan.damaged],
    )
