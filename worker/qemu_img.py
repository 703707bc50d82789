"""qemu-img: the one place vmvault runs it (create, bitmap, info, convert, compare).

Thin wrappers: each builds one command line, runs it, and turns a missing binary or a
refusal into :class:`QemuImgError` naming what was being done.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from vmvault.worker.errors import WorkerError

QEMU_IMG = "qemu-img"


class QemuImgError(WorkerError):
    """qemu-img is missing or refused. Not retryable: the message says what to fix.

    ``detail`` is qemu-img's own complaint (its stderr), for callers that word their own.
    """

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


def run(args: list[str], what: str, *, private: bool = False) -> str:
    """Run ``qemu-img <args>``; its stdout. ``private``: files it creates are 0600."""
    argv = [QEMU_IMG, *args]
    try:
        proc = subprocess.run(
            argv, check=True, capture_output=True, text=True, umask=0o077 if private else -1
        )
    except FileNotFoundError as err:
        raise QemuImgError(f"{what}: {QEMU_IMG} not found (install qemu-utils)") from err
    except subprocess.CalledProcessError as err:
        detail = (err.stderr or err.stdout or "").strip()
        raise QemuImgError(f"{what}: {' '.join(argv[:2])} failed: {detail}", detail) from err
    return proc.stdout


def create(
    path: Path,
    size: int,
    *,
    private: bool = False,
    options: str | None = None,
    what: str | None = None,
) -> None:
    """An empty (all-zero, unallocated) qcow2 image of ``size`` bytes at ``path``."""
    extra = ["-o", options] if options else []
    run(
        ["create", "-q", "-f", "qcow2", *extra, str(path), str(size)],
        what or f"creating image {path}",
        private=private,
    )


def add_bitmap(path: Path, bitmap: str, granularity: int) -> None:
    """A persistent, enabled dirty bitmap in a qcow2 that no process has open."""
    run(
        ["bitmap", "--add", "-g", str(granularity), str(path), bitmap],
        f"adding checkpoint bitmap {bitmap} to {path}",
    )


def is_locked(path: Path) -> bool:
    """True when a running QEMU holds ``path``'s image lock (``qemu-img info`` refuses)."""
    probe = subprocess.run(
        [QEMU_IMG, "info", "--output=json", str(path)], capture_output=True, text=True, check=False
    )
    return probe.returncode != 0 and "lock" in probe.stderr.lower()


def virtual_size(path: Path, fmt: str) -> int:
    """The image's virtual size in bytes (read even while a QEMU holds it: ``-U``)."""
    out = run(["info", "-U", "-f", fmt, "--output=json", str(path)], f"reading size of {path}")
    return int(json.loads(out)["virtual-size"])


def to_raw(source: Path, dest: Path, fmt: str | None = None) -> None:
    """The guest-visible content of ``source`` as a raw file (``-U``: it may be in use)."""
    source_fmt = ["-f", fmt] if fmt else []
    run(["convert", "-U", *source_fmt, "-O", "raw", str(source), str(dest)], f"reading {source}")


def identical(a: Path, b: Path, fmt_a: str = "qcow2", fmt_b: str = "qcow2") -> bool:
    """``qemu-img compare``: same guest-visible content (allocation may differ)."""
    argv = [QEMU_IMG, "compare", "-U", "-f", fmt_a, "-F", fmt_b, str(a), str(b)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError as err:
        raise QemuImgError(f"comparing {a} with {b}: {QEMU_IMG} not found") from err
    if proc.returncode not in (0, 1):  # 0 identical, 1 different, else an error
        detail = proc.stderr.strip()
        raise QemuImgError(f"qemu-img compare failed: {detail}", detail)
    return proc.returncode == 0
