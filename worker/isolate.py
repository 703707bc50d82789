"""An isolated copy of a domain's ``launch`` argv, for restore tests: no network devices.

A restore test starts a restored backup next to the live domain, on the same host: it must
never reach the domain's network (duplicate MAC and IP, a second copy of a service
answering). Removed, each with its value: ``-netdev``/``-nic``/``-net`` (either dash
form), ``-device`` entries that are NICs (a ``netdev=`` property, or a known NIC driver,
key=value or JSON syntax); then ``-nic none`` is added so QEMU adds no default NIC either.
An argv that reads options from elsewhere (``-readconfig``) cannot be proven isolated
and is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vmvault.worker.errors import WorkerError

_NET_OPTIONS = {"netdev", "nic", "net"}
_REFUSED = {"readconfig"}
# QEMU's NIC models (qemu-system-x86_64 -device help, "Network devices"), plus any driver
# with "-net" in its name (virtio-net-pci, virtio-net-device, usb-net, ...).
_NIC_DRIVERS = {
    "e1000",
    "e1000e",
    "e1000-82544gc",
    "e1000-82545em",
    "igb",
    "i82550",
    "i82551",
    "i82557a",
    "i82557b",
    "i82557c",
    "i82558a",
    "i82558b",
    "i82559a",
    "i82559b",
    "i82559c",
    "i82559er",
    "i82562",
    "i82801",
    "ne2k_isa",
    "ne2k_pci",
    "pcnet",
    "rocker",
    "rtl8139",
    "tulip",
    "vmxnet3",
    "sungem",
}


class IsolationError(WorkerError):
    """The launch argv cannot be made network-free with certainty. Not retryable."""


def _option(arg: str) -> str | None:
    """``netdev`` for ``-netdev`` or ``--netdev``; None for a value."""
    if arg.startswith("--"):
        return arg[2:]
    if arg.startswith("-") and len(arg) > 1:
        return arg[1:]
    return None


def _device_props(value: str) -> dict[str, Any]:
    if value.lstrip().startswith("{"):
        try:
            doc = json.loads(value)
        except ValueError as err:
            raise IsolationError(f"launch argv: -device {value!r} is not valid JSON") from err
        return doc if isinstance(doc, dict) else {}
    parts = value.split(",")
    props: dict[str, Any] = {"driver": parts[0]} if "=" not in parts[0] else {}
    for part in parts[1 if props else 0 :]:
        key, _, val = part.partition("=")
        props[key] = val
    return props


def is_nic(device: str) -> bool:
    """Whether a ``-device`` value is a network device."""
    props = _device_props(device)
    driver = str(props.get("driver", ""))
    return "netdev" in props or driver in _NIC_DRIVERS or "-net" in driver


# Options whose value may name a host file or unix socket (a chardev backend spec).
_CHARDEV_SPEC_OPTIONS = {"serial", "monitor", "qmp", "qmp-pretty", "parallel", "debugcon"}
_PATH_OPTIONS = {"pidfile", "D"}
_SPEC_PREFIXES = ("unix:", "file:", "pipe:")


def relocate_files(argv: list[str], scratch: Path, keep: set[str]) -> list[str]:
    """``argv`` with every host file or unix socket it names moved into ``scratch``.

    A clone started next to the live domain must not truncate its serial log (a ``file``
    chardev), steal its sockets (QEMU unlinks a server socket's path before binding it) or
    overwrite its pid file. Relocated: ``-chardev`` ``path=``/``logfile=`` values,
    ``unix:``/``file:``/``pipe:`` specs of ``-serial``, ``-monitor``, ``-qmp``, ... and
    ``-pidfile``/``-D``. Paths in ``keep`` (the clone's own QMP socket, its images) stay.
    """
    out: list[str] = []
    counter = 0

    def new_path(old: str) -> str:
        nonlocal counter
        if old in keep or old.startswith(str(scratch) + "/"):
            return old
        counter += 1
        return str(scratch / f"file-{counter}")

    i = 0
    while i < len(argv):
        arg = argv[i]
        name = _option(arg)
        if i + 1 >= len(argv) or name is None:
            out.append(arg)
            i += 1
            continue
        value = argv[i + 1]
        if name == "chardev":
            parts = value.split(",")
            for n, part in enumerate(parts):
                key, eq, val = part.partition("=")
                if eq and key in ("path", "logfile"):
                    parts[n] = f"{key}={new_path(val)}"
            value = ",".join(parts)
        elif name in _CHARDEV_SPEC_OPTIONS and value.startswith(_SPEC_PREFIXES):
            kind, _, rest = value.partition(":")
            path, sep, opts = rest.partition(",")
            value = f"{kind}:{new_path(path)}{sep}{opts}"
        elif name in _PATH_OPTIONS:
            value = new_path(value)
        out += [arg, value]
        i += 2
    return out


def isolated_argv(argv: list[str]) -> list[str]:
    """``argv`` without network devices, plus ``-nic none`` (see the module docstring)."""
    out = [argv[0]]
    i = 1
    while i < len(argv):
        arg = argv[i]
        name = _option(arg)
        value = argv[i + 1] if i + 1 < len(argv) else None
        if name in _REFUSED:
            raise IsolationError(
                f"launch argv uses {arg}: options read from a file cannot be checked for "
                "network devices; list them in launch.argv instead"
            )
        if name in _NET_OPTIONS or (name == "device" and value is not None and is_nic(value)):
            i += 2  # the option and its value
            continue
        out.append(arg)
        i += 1
    return [*out, "-nic", "none"]
