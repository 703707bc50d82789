"""Single files out of a backup (``vmvault files``): its filesystem read by a libguestfs appliance.

The disk is never attached to this host's kernel: the backup is exported read-only over
NBD (worker/serve.py's nbdkit, on a private 0600 socket, under the shared repository
lease), and a libguestfs appliance, a small QEMU VM with its own kernel, opens the export
as its drive and mounts the guest's filesystem read-only inside itself:

    vmvault files ──exported()──▶ nbdkit (plugin: regions fetched, verified)
         │                            ▲ nbd+unix:///vda?socket=…
         │ guestfs API                │
         └────────▶ appliance VM: /dev/sda → mount -o ro → ls, lstat, download
                          (a hostile filesystem meets the appliance's kernel only)

Names and link targets from the guest are data: what is written here is created
relative to directory file descriptors with ``O_NOFOLLOW``/``O_EXCL``, names with ``/``
or ``..`` are refused, and symlinks are recreated as links, never followed.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import logging
import os
import posixpath
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmvault.worker.config import FleetConfig
from vmvault.worker.errors import FilesError
from vmvault.worker.serve import Export, Listen, exported

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

# The appliance's RAM (libguestfs defaults to 1280 MiB); mounting and reading ext4/xfs
# needs far less, and TCG guests touch only what they use.
APPLIANCE_MIB = 512
# Deeper than any real tree; a crafted filesystem must not exhaust the stack.
MAX_DEPTH = 256
# Filesystem types list_filesystems reports that cannot be mounted.
_NOT_MOUNTABLE = {"", "unknown", "swap", "crypto_LUKS", "LVM2_member", "linux_raid_member"}

_KINDS = [
    (stat.S_ISDIR, "directory"),
    (stat.S_ISREG, "file"),
    (stat.S_ISLNK, "symlink"),
    (stat.S_ISCHR, "char-device"),
    (stat.S_ISBLK, "block-device"),
    (stat.S_ISFIFO, "fifo"),
    (stat.S_ISSOCK, "socket"),
]


@dataclass(frozen=True)
class Entry:
    """One directory entry of the guest filesystem (``lstat``: links are not followed)."""

    name: str
    path: str  # in the guest
    kind: str
    size: int
    mode: int  # permission bits with setuid/setgid/sticky
    mtime: float
    target: str | None = None  # symlinks only

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "name": self.name,
            "path": self.path,
            "type": self.kind,
            "size": self.size,
            "mode": f"{self.mode:04o}",
            "mtime": datetime.fromtimestamp(self.mtime, UTC).isoformat(),
        }
        if self.target is not None:
            doc["target"] = self.target
        return doc


@dataclass
class Listing:
    domain: str
    backup_id: str
    disk: str
    filesystems: dict[str, str]  # guest mount point → device
    path: str
    entries: list[Entry]

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "backup_id": self.backup_id,
            "disk": self.disk,
            "filesystems": self.filesystems,
            "path": self.path,
            "entries": [e.to_json() for e in self.entries],
        }


@dataclass
class Fetched:
    domain: str
    backup_id: str
    disk: str
    path: str
    to: str  # the local file or directory made
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    bytes: int = 0
    skipped: list[str] = field(default_factory=list)  # guest paths, with why
    duration_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "backup_id": self.backup_id,
            "disk": self.disk,
            "path": self.path,
            "to": self.to,
            "files": self.files,
            "directories": self.directories,
            "symlinks": self.symlinks,
            "bytes": self.bytes,
            "skipped": self.skipped,
            "duration_s": round(self.duration_s, 3),
        }


@dataclass(frozen=True)
class Source:
    """Which backup disk to open, and how."""

    config: FleetConfig
    config_file: Path
    domain: str
    disk: str
    backup_id: str | None = None
    at: datetime | None = None
    filesystem: str | None = None
    kvm: bool = False


def list_files(source: Source, path: str, progress: Progress) -> Listing:
    """The entries of directory ``path`` (or the one entry, if it is not a directory)."""
    with _opened(source, progress) as (export, g, mounts):
        guest = _guest_path(path)
        entry = _lookup(g, guest, source)
        if entry.kind == "symlink":
            # As ls does with a link named on its command line: a directory it points to
            # (resolved inside the guest's tree) is listed.
            with contextlib.suppress(RuntimeError, FilesError):
                pointed = _lookup(g, str(g.realpath(entry.path)), source)
                if pointed.kind == "directory":
                    entry = pointed
        entries = _children(g, entry.path) if entry.kind == "directory" else [entry]
        return Listing(
            source.domain, export.manifest.backup_id, source.disk, mounts, entry.path, entries
        )


def get_files(source: Source, path: str, to_dir: Path, force: bool, progress: Progress) -> Fetched:
    """Copy ``path`` (a file, a symlink as a link, or a directory tree) into ``to_dir``."""
    started = time.monotonic()
    guest = _guest_path(path)
    name = posixpath.basename(guest) or "root"
    target = to_dir / name
    _check_target(to_dir, target, force)  # before the appliance's start-up, not after
    with _opened(source, progress) as (export, g, _mounts):
        top = _lookup(g, guest, source)
        result = Fetched(
            source.domain, export.manifest.backup_id, source.disk, top.path, str(target)
        )
        progress(f"copying {top.path} to {target}")
        to_dir.mkdir(parents=True, exist_ok=True)
        dir_fd = os.open(to_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _copy(g, export, top, name, dir_fd, force, result, 0)
        finally:
            os.close(dir_fd)
        result.duration_s = time.monotonic() - started
        return result


# --- the appliance ----------------------------------------------------------------------


@contextlib.contextmanager
def _opened(source: Source, progress: Progress) -> Iterator[tuple[Export, Any, dict[str, str]]]:
    """The backup's disk exported, an appliance on it, its filesystem(s) mounted."""
    guestfs = _import_guestfs()
    # A short private directory: sun_path is 108 bytes, and nobody else may connect.
    sockdir = Path(tempfile.mkdtemp(prefix="vmv-files-"))
    try:
        listen = Listen(socket=sockdir / "nbd.sock")
        with exported(
            source.config,
            source.config_file,
            source.domain,
            listen,
            source.backup_id,
            source.at,
            [source.disk],
        ) as export:
            progress(f"backup {export.manifest.backup_id}: starting the appliance")
            g = _launch(guestfs, listen, source, progress, export)
            try:
                mounts = _mount(g, source, export)
                yield export, g, mounts
            except RuntimeError as err:
                # What the binding raises when the appliance fails or dies mid-way.
                export.check()
                raise FilesError(f"the libguestfs appliance failed: {_one_line(err)}") from err
            finally:
                with contextlib.suppress(RuntimeError):
                    g.shutdown()
                g.close()
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)


def _import_guestfs() -> Any:
    try:
        # Debian's python3-guestfs (no stubs; absent on some machines): imported by name.
        return importlib.import_module("guestfs")
    except ImportError as err:
        raise FilesError(
            "the libguestfs Python binding is missing: install the Debian packages"
            " python3-guestfs and linux-image-amd64 (make setup does), and run vmvault with"
            " a Python that sees /usr/lib/python3/dist-packages"
        ) from err


def appliance_cache(g: Any) -> Path:
    """Where libguestfs keeps the appliance supermin builds on first use (per user)."""
    return Path(g.get_cachedir()) / f".guestfs-{os.getuid()}" / "appliance.d"


def _launch(
    guestfs: Any, listen: Listen, source: Source, progress: Progress, export: Export
) -> Any:
    g = guestfs.GuestFS(python_return_dict=True)
    # The direct backend runs QEMU itself (the libvirt one needs libvirtd). TCG unless
    # asked: it works everywhere, while KVM inside a VM without working nested
    # virtualisation can hang the appliance instead of failing.
    if "LIBGUESTFS_BACKEND" not in os.environ:
        g.set_backend("direct")
    if not source.kvm and "LIBGUESTFS_BACKEND_SETTINGS" not in os.environ:
        g.set_backend_settings(["force_tcg"])
    g.set_memsize(APPLIANCE_MIB)
    cache = appliance_cache(g)
    if not (cache / "root").exists():
        # supermin assembles it from this host's kernel and packages: 5 s more here.
        progress(f"first use: building the appliance into {cache}")
    # The export is named after the disk; readonly: libguestfs puts a throwaway overlay
    # in front, so journal replay on mount writes there, never to the backup.
    g.add_drive_opts(
        source.disk,
        format="raw",
        readonly=True,
        protocol="nbd",
        server=[f"unix:{listen.socket}"],
    )
    started = time.monotonic()
    try:
        g.launch()
    except RuntimeError as err:
        export.check()
        raise FilesError(
            f"the libguestfs appliance did not start: {_one_line(err)}; check the Debian"
            " packages libguestfs0, supermin and linux-image-amd64 (make setup), that this"
            " user can read /boot/vmlinuz-*, and run 'libguestfs-test-tool'"
        ) from err
    progress(f"appliance started in {time.monotonic() - started:.1f}s")
    return g


def _mount(g: Any, source: Source, export: Export) -> dict[str, str]:
    """Mount read-only: ``--filesystem``, else the only one, else the guest OS's tree."""
    found = {
        dev: kind
        for dev, kind in g.list_filesystems().items()
        if kind not in _NOT_MOUNTABLE and not kind.startswith("unknown")
    }
    where = f"disk {source.disk} of backup {export.manifest.backup_id}"
    known = ", ".join(f"{d} ({k})" for d, k in sorted(found.items())) or "none"
    if source.filesystem is not None:
        if source.filesystem not in found:
            raise FilesError(f"{where} has no filesystem {source.filesystem} (it has: {known})")
        _mount_one(g, source.filesystem, found[source.filesystem], "/")
        return {"/": source.filesystem}
    if not found:
        parts = ", ".join(g.list_partitions()) or "no partitions"
        raise FilesError(
            f"{where}: no filesystem found ({parts}); is it encrypted, or"
            " a disk without a filesystem?"
        )
    if len(found) == 1:
        dev, kind = next(iter(found.items()))
        _mount_one(g, dev, kind, "/")
        return {"/": dev}
    roots = g.inspect_os()
    if len(roots) == 1:
        # The guest's own tree: / first, then /boot, /home... as its fstab says.
        points = g.inspect_get_mountpoints(roots[0])
        mounted: dict[str, str] = {}
        for point in sorted(points, key=len):
            dev = points[point]
            try:
                _mount_one(g, dev, found.get(dev, ""), point)
            except FilesError as err:
                if point == "/":
                    raise
                log.warning("%s: not mounting %s on %s: %s", where, dev, point, err)
                continue
            mounted[point] = dev
        return mounted
    raise FilesError(f"{where} has several filesystems: {known}; choose one with --filesystem")


def _mount_one(g: Any, dev: str, kind: str, point: str) -> None:
    try:
        g.mount_ro(dev, point)
        return
    except RuntimeError as err:
        first = err
    # A crash-consistent backup may need its journal replayed; if that fails, read the
    # filesystem as the last checkpoint left it.
    options = {"xfs": "ro,norecovery", "ext3": "ro,noload", "ext4": "ro,noload"}.get(kind)
    if options is not None:
        with contextlib.suppress(RuntimeError):
            g.mount_options(options, dev, point)
            return
    raise FilesError(f"cannot mount {dev} ({kind or 'unknown type'}): {_one_line(first)}")


# --- reading the guest filesystem -------------------------------------------------------


def _guest_path(path: str) -> str:
    if "\0" in path:
        raise FilesError(f"path {path!r} contains a NUL byte")
    return posixpath.normpath("/" + path.lstrip("/")).replace("//", "/")


def _lookup(g: Any, guest: str, source: Source) -> Entry:
    """The entry at ``guest``: its directory resolved inside the guest (symlinks in it are
    followed within the guest's tree), the last component not followed."""
    if guest == "/":
        return _entry(g, "/", "/", g.lstatns("/"))
    parent, name = posixpath.split(guest)
    try:
        real_parent = str(g.realpath(parent))
        st = g.lstatns(posixpath.join(real_parent, name))
    except RuntimeError as err:
        # The Python binding raises RuntimeError with the daemon's strerror (no errno).
        if any(os.strerror(code) in str(err) for code in (errno.ENOENT, errno.ENOTDIR)):
            raise FilesError(
                f"no such file or directory in the backup of {source.domain}'s disk"
                f" {source.disk}: {guest}"
            ) from err
        raise FilesError(f"{guest}: {_one_line(err)}") from err
    return _entry(g, name, posixpath.join(real_parent, name), st)


def _entry(g: Any, name: str, path: str, st: dict[str, int]) -> Entry:
    mode = st["st_mode"]
    kind = next((k for test, k in _KINDS if test(mode)), "unknown")
    target = str(g.readlink(path)) if kind == "symlink" else None
    return Entry(
        name=name,
        path=path,
        kind=kind,
        size=st["st_size"],
        mode=stat.S_IMODE(mode),
        mtime=st["st_mtime_sec"] + st["st_mtime_nsec"] / 1e9,
        target=target,
    )


def _children(g: Any, directory: str) -> list[Entry]:
    names = sorted(g.ls(directory))
    stats = g.lstatnslist(directory, names) if names else []
    links = g.readlinklist(directory, names) if names else []
    entries = []
    for name, st, link in zip(names, stats, links, strict=True):
        mode = st["st_mode"]
        kind = next((k for test, k in _KINDS if test(mode)), "unknown")
        entries.append(
            Entry(
                name=name,
                path=posixpath.join(directory, name),
                kind=kind,
                size=st["st_size"],
                mode=stat.S_IMODE(mode),
                mtime=st["st_mtime_sec"] + st["st_mtime_nsec"] / 1e9,
                target=link if kind == "symlink" else None,
            )
        )
    return entries


# --- writing here -----------------------------------------------------------------------


def _check_target(to_dir: Path, target: Path, force: bool) -> None:
    """Refuse before anything is started: a --to that is not a directory, or something
    in the way without --force."""
    for ancestor in (to_dir, *to_dir.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                raise FilesError(f"--to {to_dir}: {ancestor} is not a directory")
            break
    if (target.exists() or target.is_symlink()) and not force:
        raise FilesError(f"{target} already exists: remove it, choose another --to, or --force")


def _safe_name(name: str) -> bool:
    return name not in ("", ".", "..") and "/" not in name and "\0" not in name


def _copy(
    g: Any,
    export: Export,
    entry: Entry,
    name: str,
    dir_fd: int,
    force: bool,
    result: Fetched,
    depth: int,
) -> None:
    if not _safe_name(name):
        result.skipped.append(f"{entry.path}: unsafe name {name!r}")
        return
    if depth > MAX_DEPTH:
        result.skipped.append(f"{entry.path}: deeper than {MAX_DEPTH} levels")
        return
    if entry.kind == "directory":
        _copy_dir(g, export, entry, name, dir_fd, force, result, depth)
    elif entry.kind == "file":
        _replace(name, dir_fd, force, directory=False)
        fd = os.open(
            name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd
        )
        try:
            try:
                # /dev/fd/N: libguestfs reopens exactly the file made above.
                g.download(entry.path, f"/dev/fd/{fd}")
            except RuntimeError as err:
                export.check()
                raise FilesError(f"reading {entry.path}: {_one_line(err)}") from err
            os.fchmod(fd, entry.mode & 0o777)
            os.utime(fd, (entry.mtime, entry.mtime))
        finally:
            os.close(fd)
        result.files += 1
        result.bytes += entry.size
    elif entry.kind == "symlink":
        assert entry.target is not None
        _replace(name, dir_fd, force, directory=False)
        # Recreated as a link, never followed: where it points is the guest's business.
        os.symlink(entry.target, name, dir_fd=dir_fd)
        result.symlinks += 1
    else:
        result.skipped.append(f"{entry.path}: {entry.kind} not copied")


def _copy_dir(
    g: Any,
    export: Export,
    entry: Entry,
    name: str,
    dir_fd: int,
    force: bool,
    result: Fetched,
    depth: int,
) -> None:
    _replace(name, dir_fd, force, directory=True)
    with contextlib.suppress(FileExistsError):  # --force onto an existing directory
        os.mkdir(name, 0o700, dir_fd=dir_fd)
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        for child in _children(g, entry.path):
            _copy(g, export, child, child.name, fd, force, result, depth + 1)
        # Last: a read-only guest directory must not stop its own children being made.
        os.fchmod(fd, entry.mode & 0o777)
        os.utime(fd, (entry.mtime, entry.mtime))
    finally:
        os.close(fd)
    result.directories += 1


def _replace(name: str, dir_fd: int, force: bool, directory: bool) -> None:
    """Make room for ``name`` under --force: a file or link goes; a real directory stays
    for a directory (merged) and is refused for anything else."""
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    if not force:
        raise FilesError(f"{name} already exists in the target: use --force to replace it")
    if stat.S_ISDIR(st.st_mode):
        if directory:
            return
        raise FilesError(f"{name} is a directory in the target: not replaced by a file")
    os.unlink(name, dir_fd=dir_fd)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__
