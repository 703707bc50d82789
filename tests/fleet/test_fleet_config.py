"""Fleet additions to the config: hosts, scheduler settings, per-schedule spread, strictness."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.fleet.conftest import fleet_dict, make_config
from vmvault.worker.config import ConfigError, parse_config


def test_defaults(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    assert config.host("hv1").max_concurrent == 1
    assert config.scheduler.gc_interval_seconds == 86400
    assert config.scheduler.visibility_timeout_seconds > config.scheduler.job_time_limit_seconds


def test_hosts_and_scheduler_settings(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        hosts={"hv1": {"max_concurrent": 3}},
        scheduler={"tick_seconds": 2, "spread_seconds": 900, "gc_interval_seconds": None},
        schedules={"n": {"cron": "0 2 * * *", "domains": ["db*"], "spread_seconds": 60}},
    )
    assert config.host("hv1").max_concurrent == 3
    assert config.host("hv2").max_concurrent == 1
    assert config.scheduler.gc_interval_seconds is None
    assert config.schedules["n"].spread_seconds == 60


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"hosts": {"hv9": {}}}, "hosts.hv9: no domain runs on this host"),
        ({"hosts": {"hv1": {"max_concurrent": 0}}}, "hosts.hv1.max_concurrent"),
        ({"hosts": {"hv1": {"max_conc": 2}}}, "hosts.hv1.max_conc: unknown key"),
        ({"scheduler": {"tick": 2}}, "scheduler.tick: unknown key"),
        ({"scheduler": {"tick_seconds": 0}}, "scheduler.tick_seconds"),
        (
            {"scheduler": {"job_time_limit_seconds": 100, "visibility_timeout_seconds": 50}},
            "visibility_timeout_seconds must be longer",
        ),
        (
            {"schedules": {"n": {"cron": "0 2 * * *", "domains": ["*"], "spread_seconds": -1}}},
            "schedules.n.spread_seconds",
        ),
    ],
)
def test_bad_fleet_settings_name_the_key(
    tmp_path: Path, extra: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(fleet_dict(tmp_path, None, **extra), "f.yaml")
    assert any(message in problem for problem in info.value.problems), info.value.problems


def test_domains_matching_globs(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    assert config.domains_matching(["web*"]) == ["web1", "web2"]
    assert config.domains_matching(["db1", "web2"]) == ["db1", "web2"]
    assert config.domains_matching(["*"]) == ["db1", "web1", "web2"]
