"""Config of application-consistent backups: the documented keys load, mistakes are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmvault.worker.config import ConfigError, load_config

GOOD = """\
repository: {url: "file:///srv/repo"}
domains:
  db1:
    host: hv1
    qmp: /run/vmvault/db1.qmp
    guest_agent: /run/vmvault/db1.qga
    freeze_mountpoints: [/, /var/lib/postgresql]
    require_freeze: true
    freeze_timeout_seconds: 20
    pre_freeze: {argv: [/usr/local/bin/db-checkpoint, --fast], timeout_seconds: 30}
    post_thaw: {argv: [/usr/local/bin/db-resume]}
  web1: {host: hv1, qmp: /run/vmvault/web1.qmp}
"""

BAD = """\
repository: {url: "file:///srv/repo"}
domains:
  db1:
    host: hv1
    qmp: /run/vmvault/db1.qmp
    guest_agent: run/db1.qga
    freeze_mountpoints: [var/lib]
    pre_freeze: {argv: [db-checkpoint], timeout_seconds: 0}
  web1:
    host: hv1
    qmp: /run/vmvault/web1.qmp
    require_freeze: true
  web2:
    host: hv1
    qmp: /run/vmvault/web2.qmp
    post_thaw: {argv: [/bin/true]}
"""


def test_documented_keys_load(tmp_path: Path) -> None:
    path = tmp_path / "vmvault.yaml"
    path.write_text(GOOD)
    config = load_config(path)
    db1, web1 = config.domains["db1"], config.domains["web1"]
    assert db1.guest_agent == Path("/run/vmvault/db1.qga")
    assert db1.freeze_mountpoints == ["/", "/var/lib/postgresql"]
    assert db1.require_freeze and db1.freeze_timeout_seconds == 20
    assert db1.pre_freeze is not None and db1.pre_freeze.timeout_seconds == 30
    assert db1.post_thaw is not None and db1.post_thaw.timeout_seconds == 60
    assert web1.guest_agent is None and not web1.require_freeze


def test_mistakes_are_named(tmp_path: Path) -> None:
    path = tmp_path / "vmvault.yaml"
    path.write_text(BAD)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = "\n".join(err.value.problems)
    for fragment in [
        "domains.db1.guest_agent: must be an absolute path, got 'run/db1.qga'",
        "domains.db1.freeze_mountpoints: mountpoints must be absolute paths in the guest",
        "domains.db1.pre_freeze.argv: argv[0] must be an absolute path in the guest",
        "domains.db1.pre_freeze.timeout_seconds",
        "domains.web1: require_freeze needs guest_agent",
        "domains.web2: post_thaw needs guest_agent",
    ]:
        assert fragment in text, f"missing {fragment!r} in:\n{text}"
