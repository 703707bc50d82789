"""``vmvault notify test``: a test event to real targets, one line per target, exit code."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.fixtures.common import VENV_BIN, free_port
from tests.fixtures.notify import WebhookServer
from tests.fleet.conftest import fleet_dict, write_config


def _run(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "vmvault"), "--config", str(config), "notify", "test", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_notify_test_reports_each_target(tmp_path: Path, webhook_server: WebhookServer) -> None:
    token = tmp_path / "token"
    token.write_text("tok-9\n")
    dead = f"http://127.0.0.1:{free_port()}/"
    config = write_config(
        tmp_path / "vmvault.yaml",
        fleet_dict(
            tmp_path,
            notifications={
                "webhooks": {
                    "ops": {"url": webhook_server.url, "token_file": str(token)},
                    "dead": {"url": dead, "timeout_seconds": 2},
                }
            },
        ),
    )
    both = _run(config, "--json")
    assert both.returncode == 1, both.stderr
    results = json.loads(both.stdout)["targets"]
    assert results["ops"] == "ok"
    assert results["dead"].startswith(f"webhook dead: {dead} unreachable")
    [event] = webhook_server.events()
    assert event["event"] == "test" and event["summary"]
    assert webhook_server.headers[0]["Authorization"] == "Bearer tok-9"

    one = _run(config, "--target", "ops")
    assert one.returncode == 0 and one.stdout.strip() == "ops: ok", one.stderr
    unknown = _run(config, "--target", "nope")
    assert unknown.returncode == 1
    assert "unknown notification target 'nope' (configured: dead, ops)" in unknown.stderr


def test_notify_test_without_targets_says_how_to_add_them(tmp_path: Path) -> None:
    config = write_config(tmp_path / "vmvault.yaml", fleet_dict(tmp_path))
    out = _run(config)
    assert out.returncode == 1
    assert "no notification targets configured" in out.stderr


def test_config_summary_lists_targets_and_unreadable_secrets(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "vmvault.yaml",
        fleet_dict(
            tmp_path,
            notifications={
                "webhooks": {"ops": {"url": "http://hooks/x", "token_file": "/nonexistent/t"}},
                "email": {"mail": {"smtp_host": "mx", "from": "a@b.c", "to": ["o@b.c"]}},
            },
        ),
    )
    run = [str(VENV_BIN / "vmvault"), "--config", str(config), "config"]
    human = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert human.returncode == 0, human.stderr
    assert "notifications 2 target(s)" in human.stdout
    assert "email via mx:587 to o@b.c" in human.stdout
    assert "secret not readable on this host" in human.stdout
    doc = json.loads(subprocess.run([*run, "--json"], capture_output=True, text=True).stdout)
    assert doc["notifications"]["email"]["mail"]["from"] == "a@b.c"
