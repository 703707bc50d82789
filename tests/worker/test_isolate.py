"""Isolated launch argv for restore tests: network devices gone, no default NIC."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from vmvault.worker.isolate import IsolationError, is_nic, isolated_argv, relocate_files

BASE = ["qemu-system-x86_64", "-machine", "q35", "-m", "256"]


def test_network_options_and_nics_are_removed_and_nic_none_added() -> None:
    argv = [
        *BASE,
        "-netdev", "tap,id=n0,ifname=tap0",
        "--nic", "user,model=virtio",
        "-net", "nic",
        "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56",
        "-device", "e1000,id=second",
        "-device", json.dumps({"driver": "virtio-net-pci", "netdev": "n1"}),
        "-device", "virtio-blk-pci,drive=d0",
        "-device", "virtio-serial",
        "-drive", "file=/x.qcow2,if=none,id=d0",
    ]  # fmt: skip
    assert isolated_argv(argv) == [
        *BASE,
        "-device", "virtio-blk-pci,drive=d0",
        "-device", "virtio-serial",
        "-drive", "file=/x.qcow2,if=none,id=d0",
        "-nic", "none",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("device", "nic"),
    [
        ("virtio-net-device,netdev=x", True),
        ("driver=rtl8139", True),
        ("usb-net", True),
        ("vmxnet3,id=a", True),
        ("virtio-blk-pci,drive=d0", False),
        ("virtserialport,chardev=qga0,name=org.qemu.guest_agent.0", False),
        ('{"driver": "virtio-scsi-pci"}', False),
    ],
)
def test_is_nic(device: str, nic: bool) -> None:
    assert is_nic(device) is nic


def test_readconfig_and_bad_json_are_refused() -> None:
    with pytest.raises(IsolationError, match="-readconfig"):
        isolated_argv([*BASE, "-readconfig", "/etc/vm.cfg"])
    with pytest.raises(IsolationError, match="not valid JSON"):
        isolated_argv([*BASE, "-device", "{nope"])


def test_qemu_started_from_the_isolated_argv_has_no_network_device() -> None:
    argv = isolated_argv(
        [
            "qemu-system-x86_64", "-accel", "tcg", "-machine", "q35", "-m", "64",
            "-display", "none", "-S",
            "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0",
        ]
    )  # fmt: skip
    # QEMU's monitor on stdio: "info network" lists every NIC and backend.
    out = subprocess.run(
        [*argv, "-monitor", "stdio", "-serial", "none"],
        input="info network\nquit\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    # (Unisolated, it lists "virtio-net-pci.0: ...type=nic" and "n0: ...type=user".)
    assert "type=nic" not in out.stdout and "type=user" not in out.stdout


def test_files_and_sockets_of_the_live_domain_are_relocated(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    argv = [
        *BASE,
        "-qmp", f"unix:{scratch}/qmp,server=on,wait=off",
        "-chardev", "file,id=con,path=/var/log/web1.console",
        "-chardev", "socket,id=qga,path=/run/web1.qga,server=on,wait=off,logfile=/var/log/q",
        "-serial", "unix:/run/web1.serial,server=on,wait=off",
        "-monitor", "stdio",
        "-pidfile", "/run/web1.pid",
        "-drive", "file=/images/vda.qcow2,if=none,id=d0",
    ]  # fmt: skip
    out = relocate_files(argv, scratch, keep={"/images/vda.qcow2"})
    assert out == [
        *BASE,
        "-qmp", f"unix:{scratch}/qmp,server=on,wait=off",
        "-chardev", f"file,id=con,path={scratch}/file-1",
        "-chardev",
        f"socket,id=qga,path={scratch}/file-2,server=on,wait=off,logfile={scratch}/file-3",
        "-serial", f"unix:{scratch}/file-4,server=on,wait=off",
        "-monitor", "stdio",
        "-pidfile", f"{scratch}/file-5",
        "-drive", "file=/images/vda.qcow2,if=none,id=d0",
    ]  # fmt: skip
