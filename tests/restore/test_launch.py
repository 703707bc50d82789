"""The ``launch`` key of a domain (strict validation) and starting QEMU from it."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.common import require_binary
from vmvault.worker.config import ConfigError, LaunchConfig, parse_config
from vmvault.worker.launch import LaunchError, render_argv, start_qemu

QMP_ARG = "unix:{qmp},server=on,wait=off"


def _config(launch: Any) -> dict[str, Any]:
    return {
        "repository": {"url": "file:///srv/backups"},
        "domains": {"web1": {"host": "hv1", "qmp": "/run/web1.qmp", "launch": launch}},
    }


def test_launch_round_trip_and_render() -> None:
    argv = ["qemu-system-x86_64", "-qmp", QMP_ARG, "-blockdev",
            '{"driver":"file","filename":"{disk:vda}","node-name":"f"}',
            "-drive", "file={disk:vdb},format=qcow2,if=virtio"]  # fmt: skip
    config = parse_config(_config({"argv": argv, "image_dir": "/var/lib/img"}), "t.yaml")
    launch = config.domain("web1").launch
    assert launch is not None
    assert launch.disk_names() == ["vda", "vdb"]
    rendered = launch.render(Path("/run/q.sock"), {"vda": Path("/i/a.qcow2"), "vdb": Path("/b")})
    assert rendered[2] == "unix:/run/q.sock,server=on,wait=off"
    # JSON braces around the placeholder are left alone.
    assert rendered[4] == '{"driver":"file","filename":"/i/a.qcow2","node-name":"f"}'
    assert rendered[6] == "file=/b,format=qcow2,if=virtio"


@pytest.mark.parametrize(
    ("launch", "problem"),
    [
        ({"argv": []}, "launch.argv"),
        ({"argv": ["qemu", "-m", "64"]}, "needs a {qmp} placeholder"),
        ({"argv": ["qemu", "-qmp", QMP_ARG, "-S"]}, "must not contain '-S'"),
        ({"argv": ["qemu", "-qmp", QMP_ARG, "-incoming", "defer"]}, "must not contain"),
        ({"argv": ["qemu", "-qmp", QMP_ARG, "file={disk:../x}"]}, "bad placeholder"),
        ({"argv": ["-m", "{qmp}"]}, "argv[0] must be the QEMU binary"),
        ({"argv": ["qemu", "{qmp}"], "image_dir": "rel/dir"}, "image_dir must be an absolute"),
        ({"argv": ["qemu", "{qmp}"], "disks": {}}, "launch.disks: unknown key"),
    ],
)
def test_bad_launch_is_refused(launch: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_config(launch), "t.yaml")
    assert problem in str(info.value), str(info.value)
    assert "domains.web1.launch" in str(info.value)


def test_render_needs_every_disk_both_ways() -> None:
    launch = LaunchConfig(argv=["qemu", "-qmp", QMP_ARG, "{disk:vda}"])
    qmp = Path("/q")
    with pytest.raises(LaunchError, match=r"uses \{disk:vda\} but disk 'vda' is not being"):
        render_argv("web1", launch, qmp, {}, incoming=True)
    with pytest.raises(LaunchError, match=r"disk 'vdb' is restored but launch.argv has no"):
        render_argv("web1", launch, qmp, {"vda": Path("/a"), "vdb": Path("/b")}, incoming=True)
    argv = render_argv("web1", launch, qmp, {"vda": Path("/a")}, incoming=True)
    assert argv[-3:] == ["-S", "-incoming", "defer"]


def test_qemu_that_fails_to_start_shows_its_stderr(tmp_path: Path) -> None:
    qemu = require_binary("qemu-system-x86_64")
    sockdir = Path(tempfile.mkdtemp(prefix="vmv"))
    argv = [qemu, "-M", "q35", "-accel", "tcg", "-nodefaults", "-display", "none",
            "-qmp", f"unix:{sockdir}/q,server=on,wait=off", "-no-such-option"]  # fmt: skip
    try:
        with pytest.raises(LaunchError) as info:
            start_qemu("web1", argv, sockdir / "q", tmp_path / "qemu.log")
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)
    message = str(info.value)
    assert "QEMU exited with code 1" in message
    assert "-no-such-option" in message and "invalid option" in message


def test_missing_binary_is_named(tmp_path: Path) -> None:
    with pytest.raises(LaunchError, match="cannot start /nonexistent/qemu"):
        start_qemu("web1", ["/nonexistent/qemu"], tmp_path / "q", tmp_path / "log")
