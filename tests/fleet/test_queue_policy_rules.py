"""The worker's queue policy as pure rules, the ``worker:`` config block and URL masking.

The real-worker side (refusals recorded in the registry, nothing touched) is in
``test_queue_policy.py``; here each rule is checked against its config, one case per rule.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.fleet.conftest import fleet_dict
from vmvault.storage.locks import DEFAULT_GRACE
from vmvault.worker.config import ConfigError, UnknownDomainError, parse_config
from vmvault.worker.job_policy import (
    JobRefusedError,
    check_gc,
    check_prune,
    check_restore,
    check_verify,
    keeps_at_least,
)
from vmvault.worker.redact import mask_url, redact

BACKUP_ID = "20260301T020000.000000Z-1a2b3c4d"


def _config(tmp: Path, **extra: Any) -> Any:
    data = fleet_dict(tmp)
    data["domains"]["web2"]["launch"] = {
        "argv": ["qemu-system-x86_64", "-qmp", "unix:{qmp},server=on,wait=off"],
        "image_dir": str(tmp / "vm-images" / "web2"),
    }
    data["schedules"] = {
        "nightly": {"cron": "0 2 * * *", "domains": ["web*"], "retention": {"keep_last": 3}},
        "weekly": {"cron": "0 3 * * 0", "domains": ["db1"], "retention": {"keep_weekly": 4}},
    }
    data.update(extra)
    return parse_config(data, "test.yaml")


# -- the worker: block ---------------------------------------------------------------


def test_worker_block_defaults(tmp_path: Path) -> None:
    config = _config(tmp_path)
    assert config.worker.allow_force_from_queue is False
    assert config.worker.prune_policies == []
    # The queue's minimum is the GC's own default: a queued gc without grace is unchanged.
    assert config.worker.gc_grace_seconds == DEFAULT_GRACE
    # Default roots: the state dir's images and every launch.image_dir of the config.
    assert config.restore_roots() == [
        Path(os.path.realpath(tmp_path / "state" / "images")),
        Path(os.path.realpath(tmp_path / "vm-images" / "web2")),
    ]


def test_worker_block_explicit(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        worker={
            "restore_roots": [str(tmp_path / "restores")],
            "allow_force_from_queue": True,
            "prune_policies": [{"keep_daily": 7}],
            "gc_grace_seconds": 7200,
        },
    )
    assert config.restore_roots() == [Path(os.path.realpath(tmp_path / "restores"))]
    assert config.worker.allow_force_from_queue is True
    assert config.worker.gc_grace_seconds == 7200


@pytest.mark.parametrize(
    ("worker", "message"),
    [
        ({"restore_roots": ["relative/dir"]}, "worker.restore_roots[0]: must be an absolute path"),
        ({"allow_force": True}, "worker.allow_force: unknown key"),
        ({"gc_grace_seconds": -1}, "worker.gc_grace_seconds"),
        ({"prune_policies": [{}]}, "worker.prune_policies[0]"),
        ({"prune_policies": [{"keep_last": 0}]}, "worker.prune_policies[0].keep_last"),
    ],
)
def test_bad_worker_block_names_the_key(
    tmp_path: Path, worker: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(fleet_dict(tmp_path, None, worker=worker), "f.yaml")
    assert any(message in p for p in info.value.problems), info.value.problems


# -- broker password file -----------------------------------------------------------


def test_broker_password_file_goes_into_the_url(tmp_path: Path) -> None:
    secret = tmp_path / "redis_password"
    # Characters that mean something in a URL are escaped, and the trailing newline dropped.
    secret.write_text("p@ss/w:rd%?#\n")
    data = fleet_dict(tmp_path, "redis://redis:6379/0", broker_password_file=str(secret))
    config = parse_config(data, "f.yaml")
    assert config.broker == "redis://redis:6379/0"
    assert config.broker_url() == "redis://:p%40ss%2Fw%3Ard%25%3F%23@redis:6379/0"
    # An ACL user named in the URL keeps its name.
    data["broker"] = "rediss://vmvault@redis:6380/1?ssl_cert_reqs=required"
    config = parse_config(data, "f.yaml")
    assert config.broker_url() == (
        "rediss://vmvault:p%40ss%2Fw%3Ard%25%3F%23@redis:6380/1?ssl_cert_reqs=required"
    )
    url = config.broker_url()
    assert url is not None
    pool_kwargs = redis.Redis.from_url(url).connection_pool.connection_kwargs
    assert pool_kwargs["password"] == "p@ss/w:rd%?#" and pool_kwargs["username"] == "vmvault"


def test_broker_without_password_file_is_used_as_is(tmp_path: Path) -> None:
    config = parse_config(fleet_dict(tmp_path, "redis://:inline@r:6379/0"), "f.yaml")
    assert config.broker_url() == "redis://:inline@r:6379/0"
    assert parse_config(fleet_dict(tmp_path), "f.yaml").broker_url() is None


@pytest.mark.parametrize(
    ("broker", "message"),
    [
        (None, "broker_password_file: needs a broker URL"),
        ("redis://:inline@r:6379/0", "broker: the URL carries a password and"),
    ],
)
def test_broker_password_file_conflicts(tmp_path: Path, broker: str | None, message: str) -> None:
    data = fleet_dict(tmp_path, broker, broker_password_file=str(tmp_path / "pw"))
    with pytest.raises(ConfigError) as info:
        parse_config(data, "f.yaml")
    assert any(message in p for p in info.value.problems), info.value.problems


def test_unreadable_or_empty_password_file_is_a_config_error(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    data = fleet_dict(tmp_path, "redis://r:6379/0", broker_password_file=str(secret))
    config = parse_config(data, "f.yaml")
    with pytest.raises(ConfigError, match=r"broker_password_file: cannot read .*/pw: No such"):
        config.broker_url()
    secret.write_text("\n")
    with pytest.raises(ConfigError, match=r"broker_password_file: .*/pw is empty"):
        config.broker_url()


# -- masking ------------------------------------------------------------------------


def test_mask_url() -> None:
    assert mask_url("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert mask_url("rediss://user:s3cret@host/0?x=1") == "rediss://user:***@host/0?x=1"
    assert mask_url("redis://host:6379/0") == "redis://host:6379/0"
    assert mask_url("redis://user@host:6379/0") == "redis://user@host:6379/0"


def test_redact_masks_every_url_password_in_a_text() -> None:
    text = (
        "cannot reach redis://:s3cret@h:1/0 and rediss://u:p%40ss@h2/0; "
        "raw redis://:we@ird@h3:1/0 too"
    )
    out = redact(text)
    for secret in ("s3cret", "p%40ss", "we@ird", "ird@h3"):
        assert secret not in out, out
    assert "redis://:***@h:1/0" in out and "rediss://u:***@h2/0" in out
    assert "redis://:***@h3:1/0" in out
    assert redact("no url here: a:b@c") == "no url here: a:b@c"


# -- restore ------------------------------------------------------------------------


def _restore(config: Any, **kwargs: Any) -> Any:
    args: dict[str, Any] = {"domain": "web1", "to_dir": None, "incoming": False}
    args.update(kwargs)
    return check_restore(config, **args)


def test_restore_under_a_root_is_admitted(tmp_path: Path) -> None:
    config = _config(tmp_path)
    target = tmp_path / "state" / "images" / "web1-restored"
    args = _restore(
        config,
        to_dir=str(target),
        backup_id=BACKUP_ID,
        disks=["vda", "vdb"],
    )
    assert args.to_dir == target and args.backup_id == BACKUP_ID
    assert args.disks == ["vda", "vdb"] and args.force is False
    at = _restore(config, to_dir=str(target), at="2026-03-01T02:00:00+00:00").at
    assert at is not None and at.tzinfo is not None
    # Incoming into the domain's own image_dir (the default target) is admitted.
    assert _restore(config, domain="web2", incoming=True).incoming is True


@pytest.mark.parametrize(
    "target",
    [
        "/etc",
        "{tmp}/elsewhere",
        "{tmp}/state/images/../../escape",  # '..' out of the root
        "{tmp}/state/imagesX",  # a sibling whose name starts like the root
        "{tmp}/state/images/link/sub",  # a symlink inside the root pointing out
    ],
)
def test_restore_outside_the_roots_is_refused(tmp_path: Path, target: str) -> None:
    (tmp_path / "state" / "images").mkdir(parents=True)
    (tmp_path / "state" / "images" / "link").symlink_to(tmp_path / "outside")
    config = _config(tmp_path)
    with pytest.raises(JobRefusedError, match=r"^restore refused by worker\.restore_roots: "):
        _restore(config, to_dir=target.format(tmp=tmp_path))


def test_incoming_restore_checks_the_image_dir_too(tmp_path: Path) -> None:
    config = _config(tmp_path, worker={"restore_roots": [str(tmp_path / "state" / "images")]})
    # web2's launch.image_dir is no longer a root: its default target is refused.
    with pytest.raises(JobRefusedError, match=r"worker\.restore_roots: .*vm-images/web2"):
        _restore(config, domain="web2", incoming=True)
    # An empty list refuses every queued restore.
    config = _config(tmp_path, worker={"restore_roots": []})
    with pytest.raises(JobRefusedError, match=r"no restore roots"):
        _restore(config, to_dir=str(tmp_path / "state" / "images" / "x"))


def test_live_restore_checks_the_image_dir(tmp_path: Path) -> None:
    config = _config(tmp_path)
    args = _restore(config, domain="web2", live=True, speed=2**20)
    assert args.live is True and args.speed == 2**20 and args.to_dir is None
    assert args.live_kwargs()["speed"] == 2**20 and "live" not in args.run_kwargs()
    config = _config(tmp_path, worker={"restore_roots": [str(tmp_path / "state" / "images")]})
    with pytest.raises(JobRefusedError, match=r"worker\.restore_roots: .*vm-images/web2"):
        _restore(config, domain="web2", live=True)


def test_force_from_the_queue_needs_the_worker_setting(tmp_path: Path) -> None:
    target = str(tmp_path / "state" / "images" / "web1")
    with pytest.raises(JobRefusedError, match=r"^restore refused by worker\.allow_force_from"):
        _restore(_config(tmp_path), to_dir=target, force=True)
    allowed = _config(tmp_path, worker={"allow_force_from_queue": True})
    assert _restore(allowed, to_dir=target, force=True).force is True


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"domain": ["web1"]}, "bad domain"),
        ({"domain": "../web1"}, "bad domain"),
        ({"backup_id": "../../x"}, "bad backup_id"),
        ({"at": "yesterday"}, "bad at"),
        ({"at": 5}, "bad at"),
        ({"backup_id": BACKUP_ID, "at": "2026-03-01T02:00:00"}, "backup_id or at, not both"),
        ({"disks": ["../../etc/x"]}, "bad disks"),
        ({"disks": "vda"}, "bad disks"),
        ({"force": "yes"}, "bad force"),
        ({"incoming": 1}, "bad incoming"),
        ({"boot": "false"}, "bad boot"),
        ({"to_dir": "relative/dir"}, "bad to_dir"),
        ({"to_dir": "/srv/a\0b"}, "bad to_dir"),
        ({"live": "true"}, "bad live"),
        ({"live": True, "speed": -1}, "bad speed"),
        ({"live": True, "speed": True}, "bad speed"),
        ({"live": True, "speed": "1M"}, "bad speed"),
        ({"live": True, "disks": ["vda"]}, "live goes with neither"),
        ({"live": True, "incoming": True}, "live goes with neither"),
        ({"speed": 1024}, "speed is for live restores"),
    ],
)
def test_restore_arguments_are_validated(
    tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    args: dict[str, Any] = {"to_dir": str(tmp_path / "state" / "images" / "r")}
    args.update(kwargs)
    with pytest.raises(JobRefusedError, match=r"^restore refused \(job arguments\): ") as info:
        _restore(_config(tmp_path), **args)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_restore_of_an_unknown_domain_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnknownDomainError):
        _restore(_config(tmp_path), domain="nosuch", to_dir=str(tmp_path / "state" / "images"))


def test_long_hostile_values_are_cut_in_the_message(tmp_path: Path) -> None:
    with pytest.raises(JobRefusedError) as info:
        _restore(_config(tmp_path), backup_id="x" * 100_000, to_dir="/tmp/x")
    assert len(str(info.value)) < 400


# -- prune --------------------------------------------------------------------------


def test_keeps_at_least() -> None:
    assert keeps_at_least({"last": 3}, {"last": 3})
    assert keeps_at_least({"last": 5, "daily": 1}, {"last": 3})
    assert not keeps_at_least({"last": 1}, {"last": 3})
    assert not keeps_at_least({"daily": 30}, {"last": 3})
    assert not keeps_at_least({"last": 3}, {"last": 3, "weekly": 4})


def test_prune_with_a_schedules_retention_is_admitted(tmp_path: Path) -> None:
    config = _config(tmp_path)
    # The scheduler's spelling (keep_last) and the CLI's (last) are the same policy.
    assert check_prune(config, {"keep_last": 3}, ["web1", "web2"], False) == {"last": 3}
    assert check_prune(config, {"last": 3}, ["web1"], False) == {"last": 3}
    # Keeping more than the schedule is harmless.
    assert check_prune(config, {"last": 9, "daily": 2}, ["web2"], False) == {"last": 9, "daily": 2}
    assert check_prune(config, {"keep_weekly": 4}, ["db1"], False) == {"weekly": 4}


@pytest.mark.parametrize(
    ("policy", "domains", "message"),
    [
        ({"keep_last": 1}, ["web1"], "keep_last: 1 for web1"),
        ({"keep_weekly": 4}, ["web1"], "keep_weekly: 4 for web1"),  # db1's schedule, not web1's
        ({"keep_last": 3}, ["db1"], "keep_last: 3 for db1"),
        ({"keep_last": 3}, ["old-vm"], "for old-vm"),  # a domain no schedule covers
        ({"keep_last": 3}, None, "all domains"),
    ],
)
def test_prune_inventing_a_policy_is_refused(
    tmp_path: Path, policy: dict[str, int], domains: list[str] | None, message: str
) -> None:
    with pytest.raises(JobRefusedError, match=r"^prune refused by worker\.prune_policies: ") as e:
        check_prune(_config(tmp_path), policy, domains, False)
    assert message in str(e.value)


def test_prune_allow_list_covers_every_domain(tmp_path: Path) -> None:
    config = _config(tmp_path, worker={"prune_policies": [{"keep_daily": 7}]})
    assert check_prune(config, {"keep_daily": 7}, None, False) == {"daily": 7}
    assert check_prune(config, {"daily": 10}, ["old-vm"], False) == {"daily": 10}
    with pytest.raises(JobRefusedError):
        check_prune(config, {"keep_daily": 6}, None, False)


def test_prune_dry_run_deletes_nothing_so_any_policy_may_be_planned(tmp_path: Path) -> None:
    assert check_prune(_config(tmp_path), {"keep_last": 1}, None, True) == {"last": 1}


@pytest.mark.parametrize(
    ("policy", "domains", "dry_run", "message"),
    [
        ({}, ["web1"], False, "bad policy"),
        ({"keep_forever": 1}, ["web1"], False, "bad policy"),
        ({"keep_last": 0}, ["web1"], False, "bad policy"),
        ({"keep_last": True}, ["web1"], False, "bad policy"),
        ({"keep_last": "3"}, ["web1"], False, "bad policy"),
        ({"keep_last": 3, "last": 3}, ["web1"], False, "bad policy"),
        ([3], ["web1"], False, "bad policy"),
        ({"keep_last": 3}, "web1", False, "bad domains"),
        ({"keep_last": 3}, ["../x"], False, "bad domains"),
        ({"keep_last": 3}, ["web1"], "no", "bad dry_run"),
    ],
)
def test_prune_arguments_are_validated(
    tmp_path: Path, policy: Any, domains: Any, dry_run: Any, message: str
) -> None:
    with pytest.raises(JobRefusedError, match=r"^prune refused \(job arguments\): ") as info:
        check_prune(_config(tmp_path), policy, domains, dry_run)
    assert message in str(info.value)


# -- gc and verify ------------------------------------------------------------------


def test_gc_grace_from_the_queue(tmp_path: Path) -> None:
    config = _config(tmp_path, worker={"gc_grace_seconds": 7200})
    assert check_gc(config, None, False) == 7200
    assert check_gc(config, 7200, False) == 7200
    assert check_gc(config, 86400.5, True) == 86400.5
    with pytest.raises(JobRefusedError, match=r"^gc refused by worker\.gc_grace_seconds: "):
        check_gc(config, 0, False)
    with pytest.raises(JobRefusedError, match=r"worker\.gc_grace_seconds"):
        check_gc(_config(tmp_path), DEFAULT_GRACE - 1, False)


@pytest.mark.parametrize(
    ("grace", "dry_run"),
    [(math.nan, False), (math.inf, False), ("3600", False), (True, False), (3600, "yes")],
)
def test_gc_arguments_are_validated(tmp_path: Path, grace: Any, dry_run: Any) -> None:
    with pytest.raises(JobRefusedError, match=r"^gc refused \(job arguments\): bad"):
        check_gc(_config(tmp_path), grace, dry_run)


def test_verify_arguments_are_validated() -> None:
    check_verify(None, False)
    check_verify(BACKUP_ID, True)
    with pytest.raises(JobRefusedError, match=r"^verify refused \(job arguments\): bad backup_id"):
        check_verify("../../etc", False)
    with pytest.raises(JobRefusedError, match=r"bad read_data"):
        check_verify(None, "yes")


@pytest.mark.parametrize(
    "broker",
    [
        "rediss://r:6380/0",
        "rediss://r:6380/0?ssl_ca_certs=/etc/vmvault/ca.crt",
        "rediss://r:6380/0?ssl_cert_reqs=maybe",
    ],
)
def test_tls_broker_url_needs_ssl_cert_reqs(tmp_path: Path, broker: str) -> None:
    # Celery refuses such a URL with a traceback at the first job: say it in the config.
    with pytest.raises(ConfigError) as info:
        parse_config(fleet_dict(tmp_path, broker), "f.yaml")
    assert any("ssl_cert_reqs=required" in p for p in info.value.problems), info.value.problems


def test_tls_broker_url_with_ssl_cert_reqs_is_accepted(tmp_path: Path) -> None:
    for reqs in ("required", "CERT_REQUIRED", "optional", "none"):
        url = f"rediss://r:6380/0?ssl_cert_reqs={reqs}&ssl_ca_certs=/etc/ca.crt"
        assert parse_config(fleet_dict(tmp_path, url), "f.yaml").broker == url
