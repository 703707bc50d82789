"""Verification records: one small authenticated object per backup saying when it was last
checked, how (structure or data), and with what outcome (section 30 of
docs/repository-format.md).

A record is never needed to restore: any record that cannot be read, authenticated or
understood is *unknown* (treated as never verified), never an error that stops a reader.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from vmvault.storage.errors import StorageError
from vmvault.storage.format import (
    VERIFICATION_NAME,
    backup_prefix,
    canonical_json,
    check_name,
    iso,
    parse_json,
    stored_limit,
)
from vmvault.storage.repository import Repository

RECORD_NAME = VERIFICATION_NAME
RECORD_VERSION = 1
MAX_RECORD_BYTES = 64 * 1024
MAX_RECORD_DEPTH = 8
MAX_PROBLEMS = 10
MAX_PROBLEM_CHARS = 300

VerifyKind = Literal["structure", "data", "restore-test"]
KINDS: tuple[str, ...] = ("structure", "data", "restore-test")


def record_key(domain: str, backup_id: str) -> str:
    return backup_prefix(domain, backup_id) + RECORD_NAME


@dataclass(frozen=True)
class Check:
    """One verification of one backup."""

    time: datetime
    kind: str
    ok: bool
    problems: tuple[str, ...] = ()
    problem_count: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "time": iso(self.time),
            "kind": self.kind,
            "ok": self.ok,
            "problems": list(self.problems),
            "problem_count": self.problem_count,
        }

    @classmethod
    def from_json(cls, doc: Any) -> Check:
        """Strict: anything unexpected raises ValueError (the caller says "unknown")."""
        if not isinstance(doc, dict):
            raise ValueError("a check must be an object")
        kind, ok, problems, count = (
            doc.get("kind"),
            doc.get("ok"),
            doc.get("problems"),
            doc.get("problem_count"),
        )
        if kind not in KINDS or not isinstance(ok, bool):
            raise ValueError("bad kind or ok")
        if not isinstance(problems, list) or len(problems) > MAX_PROBLEMS:
            raise ValueError("bad problems")
        if not all(isinstance(p, str) and len(p) <= MAX_PROBLEM_CHARS for p in problems):
            raise ValueError("bad problem text")
        if isinstance(count, bool) or not isinstance(count, int) or count < len(problems):
            raise ValueError("bad problem_count")
        if ok and problems:
            raise ValueError("ok with problems")
        return cls(_time(doc.get("time")), kind, ok, tuple(problems), count)


@dataclass(frozen=True)
class Verification:
    """A backup's record: its latest check and its latest successful one."""

    domain: str
    backup_id: str
    latest: Check
    last_ok: Check | None

    @property
    def key(self) -> str:
        return record_key(self.domain, self.backup_id)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": RECORD_VERSION,
            "domain": self.domain,
            "backup_id": self.backup_id,
            "latest": self.latest.to_json(),
            "last_ok": self.last_ok.to_json() if self.last_ok else None,
        }

    def summary(self) -> str:
        """``verified 2026-12-01 (data)`` or ``FAILED 2026-12-02 (data): <first problem>``."""
        c = self.latest
        if c.ok:
            return f"verified {c.time:%Y-%m-%d} ({c.kind})"
        first = c.problems[0] if c.problems else "no detail recorded"
        return f"FAILED {c.time:%Y-%m-%d} ({c.kind}): {first}"

    def status_json(self) -> dict[str, Any]:
        """What ``list --json`` / ``show --json`` print under ``verification``."""
        return {"status": "verified" if self.latest.ok else "failed", **self.to_json()}


UNKNOWN_JSON: dict[str, Any] = {"status": "unverified"}


def _time(value: Any) -> datetime:
    if not isinstance(value, str) or len(value) > 40:
        raise ValueError("bad time")
    ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if ts.tzinfo is None:
        raise ValueError("time without a zone")
    return ts.astimezone(UTC)


def _clip(text: str) -> str:
    return text if len(text) <= MAX_PROBLEM_CHARS else text[: MAX_PROBLEM_CHARS - 1] + "…"


def new_check(kind: str, problems: Iterable[str], now: datetime | None = None) -> Check:
    """A check with its problem list capped (the first ones kept, the count exact)."""
    if kind not in KINDS:
        raise StorageError(f"verification kind must be one of {', '.join(KINDS)}, not {kind!r}")
    listed = list(problems)
    shown = tuple(_clip(p) for p in listed[:MAX_PROBLEMS])
    return Check(now or datetime.now(UTC), kind, not listed, shown, len(listed))


# --------------------------------------------------------------------------- sealing


def seal_record(repo: Repository, record: Verification) -> bytes:
    """Checksummed JSON (keyed in an encrypted repository), encrypted with the key as
    associated data: a record cannot be forged, edited or moved to another backup."""
    doc = record.to_json()
    doc["checksum"] = repo.codec.digest(canonical_json(doc))
    return repo.codec.encrypt(record.key, json.dumps(doc).encode())


def _unseal(repo: Repository, key: str, stored: bytes) -> Verification:
    """The record in ``stored``; ValueError or StorageError when it is not a good one."""
    raw = repo.codec.decrypt(key, stored)
    doc = parse_json(raw, f"verification record {key}", MAX_RECORD_BYTES, MAX_RECORD_DEPTH)
    if not isinstance(doc, dict) or doc.get("version") != RECORD_VERSION:
        raise ValueError("not a version 1 record")
    checksum = doc.pop("checksum", None)
    if checksum != repo.codec.digest(canonical_json(doc)):
        raise ValueError("checksum mismatch")
    domain, backup_id = doc.get("domain"), doc.get("backup_id")
    if not isinstance(domain, str) or not isinstance(backup_id, str):
        raise ValueError("bad names")
    if record_key(domain, backup_id) != key:
        raise ValueError("names another backup")
    latest = Check.from_json(doc.get("latest"))
    last_ok = None if doc.get("last_ok") is None else Check.from_json(doc["last_ok"])
    if last_ok is not None and not last_ok.ok:
        raise ValueError("last_ok is not ok")
    return Verification(domain, backup_id, latest, last_ok)


def read_record(repo: Repository, domain: str, backup_id: str) -> Verification | None:
    """The backup's record; None when there is none or it is not a good one (unknown)."""
    return _read_key(repo, record_key(domain, backup_id))


def _read_key(repo: Repository, key: str) -> Verification | None:
    try:
        stored = repo.backend.get(key, max_size=stored_limit(MAX_RECORD_BYTES))
        return _unseal(repo, key, stored)
    except (StorageError, ValueError, TypeError, OverflowError):
        # Missing, too big, unauthentic, edited, nested too deep, odd types: unknown.
        return None


def record_check(repo: Repository, domain: str, backup_id: str, check: Check) -> Verification:
    """Write ``check`` as the backup's latest, keeping its last successful one.

    Only for a backup whose manifest exists (the caller just read it); if a prune removes
    the backup meanwhile, the record is litter that GC removes with the backup's other
    objects (section 12).
    """
    check_name(domain, "domain")
    before = read_record(repo, domain, backup_id)
    last_ok = check if check.ok else (before.last_ok if before else None)
    record = Verification(domain, backup_id, check, last_ok)
    repo.backend.put(record.key, seal_record(repo, record))
    return record


def load_records(
    repo: Repository,
    domain: str | None = None,
    listing: list[tuple[str, str, str, str]] | None = None,
) -> dict[tuple[str, str], Verification]:
    """Every good record (of ``domain`` or all), by ``(domain, backup_id)``: one listing
    of ``backups/`` (or ``listing``, ``Repository.backup_objects``'s), then a GET of each
    record found, in parallel."""
    objects = repo.backup_objects(domain) if listing is None else listing
    keys = [key for _, _, leaf, key in objects if leaf == RECORD_NAME]
    out: dict[tuple[str, str], Verification] = {}
    for record in repo.pool.map(lambda k: _read_key(repo, k), keys):
        if record is not None:
            out[(record.domain, record.backup_id)] = record
    return out


def failed_checks(repo: Repository, domain: str) -> dict[str, str]:
    """Backup id → summary, for ``domain``'s backups whose latest verification (structure
    or data) FAILED. A failed restore test is not counted: it also fails for reasons
    outside the backup (a port in use, a slow host), and forcing every later backup full
    would not fix those; damage it meets is what verify jobs report."""
    return {
        bid: record.summary()
        for (_, bid), record in load_records(repo, domain).items()
        if not record.latest.ok and record.latest.kind != "restore-test"
    }
