"""``verify_jobs`` config and the queue policy of a queued scheduled verify (pure logic)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.fleet.conftest import make_config
from vmvault.storage.format import Manifest
from vmvault.storage.verification import Check, Verification
from vmvault.worker.config import ConfigError
from vmvault.worker.job_policy import JobRefusedError, check_restore_test, check_verify
from vmvault.worker.verify_job import due_backups

BACKUP_ID = "20260101T020000.000000Z-1a2b3c4d"
NOW = datetime(2026, 3, 10, tzinfo=UTC)


def test_verify_jobs_parse_with_defaults(tmp_path: Path) -> None:
    config = make_config(
        tmp_path, verify_jobs={"weekly": {"cron": "0 4 * * 0", "domains": ["web*"]}}
    )
    job = config.verify_jobs["weekly"]
    assert (job.read_data, job.outdated_after) == (False, None)
    assert config.domains_matching(job.domains) == ["web1", "web2"]


@pytest.mark.parametrize(
    ("job", "message"),
    [
        ({"cron": "nope", "domains": ["web1"]}, "bad cron expression 'nope'"),
        ({"cron": "0 4 * * 0", "domains": ["mail*"]}, "verify_jobs.v.domains: 'mail*' matches"),
        ({"cron": "0 4 * * 0", "domains": []}, "verify_jobs.v.domains"),
        ({"cron": "0 4 * * 0", "domains": ["web1"], "outdated_after": -1}, "outdated_after"),
        ({"cron": "0 4 * * 0", "domains": ["web1"], "read_dat": True}, "read_dat"),
    ],
)
def test_bad_verify_jobs_name_the_key(tmp_path: Path, job: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("*", r"\*").replace(".", r"\.")):
        make_config(tmp_path, verify_jobs={"v": job})


def test_queued_verify_job_must_be_one_of_this_workers(tmp_path: Path) -> None:
    config = make_config(tmp_path, verify_jobs={"v": {"cron": "0 4 * * 0", "domains": ["db1"]}})
    check_verify(None, False, "v", config)
    with pytest.raises(JobRefusedError, match=r"^verify refused \(job arguments\): bad job"):
        check_verify(None, False, "other", config)
    with pytest.raises(JobRefusedError, match=r"bad job"):
        check_verify(None, False, ["v"], config)
    with pytest.raises(JobRefusedError, match=r"a verify job picks its own backups"):
        check_verify(BACKUP_ID, False, "v", config)
    with pytest.raises(JobRefusedError, match="repository"):
        check_verify(None, False, "v", config, "offsite")


def _manifest(backup_id: str) -> Manifest:
    return Manifest.from_json(
        {
            "version": 2,
            "backup_id": backup_id,
            "domain": "web1",
            "parent": None,
            "kind": "full",
            "reason": "test",
            "checkpoint": None,
            "created": "2026-01-01T02:00:00Z",
            "finished": "2026-01-01T02:00:01Z",
            "chunk_size": 65536,
            "disks": [],
        },
        "test",
    )


def test_due_is_never_verified_failed_or_last_ok_older_than_outdated_after() -> None:
    ids = [f"2026010{i}T020000.000000Z-1a2b3c4d" for i in range(1, 6)]
    ms = [_manifest(i) for i in ids]

    def record(i: int, latest_ok: bool, last_ok_days: float | None) -> Verification:
        ok = (
            None
            if last_ok_days is None
            else Check(NOW - timedelta(days=last_ok_days), "data", True)
        )
        latest = Check(
            NOW - timedelta(hours=1),
            "data",
            latest_ok,
            () if latest_ok else ("x",),
            0 if latest_ok else 1,
        )
        return Verification("web1", ids[i], latest, ok)

    records = {
        ("web1", ids[1]): record(1, True, 0.5),  # fresh: skipped
        ("web1", ids[2]): record(2, True, 3),  # outdated: due
        ("web1", ids[3]): record(3, False, 0.5),  # failed since its last ok: still fresh ok
        ("web1", ids[4]): record(4, False, None),  # never ok: due
    }
    due = due_backups(ms, records, 2, NOW)
    assert [m.backup_id for m in due] == [ids[0], ids[2], ids[4]]
    assert due_backups(ms, records, None, NOW) == ms


def test_restore_test_needs_a_domain_with_launch_and_a_known_job(tmp_path: Path) -> None:
    job = {"cron": "0 4 * * 0", "domains": ["web*"], "restore_test": {}}
    with pytest.raises(ConfigError, match=r"verify_jobs\.v\.restore_test: none of its domains"):
        make_config(tmp_path, verify_jobs={"v": job})
    with pytest.raises(ConfigError, match=r"boot"):
        make_config(tmp_path, verify_jobs={"v": {**job, "restore_test": {"boot": "booted"}}})
    launch = {"argv": ["qemu-system-x86_64", "-qmp", "unix:{qmp},server=on,wait=off"]}
    domains = {
        "web1": {"host": "hv1", "qmp": "/run/vmv/web1.qmp", "launch": launch},
        "web2": {"host": "hv1", "qmp": "/run/vmv/web2.qmp"},
    }
    config = make_config(tmp_path, domains=domains, verify_jobs={"v": job})
    assert config.restore_test_domains("v") == ["web1"]
    check_restore_test(config, "web1", "v")
    with pytest.raises(JobRefusedError, match=r"bad domain 'web2'"):
        check_restore_test(config, "web2", "v")
    with pytest.raises(JobRefusedError, match=r"bad job"):
        check_restore_test(config, "web1", "w")
