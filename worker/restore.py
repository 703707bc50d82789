"""One restore job: a backup's disks written back over NBD, verified, as files or into a domain.

Two targets, one data path: repository reader (bounded parallel prefetch) →
``NbdDiskWriter.write_and_verify`` (windows written, flushed, read back and checked
against the index while the next ones are written) → final flush:

    files     qemu-img create → qemu-nbd on a 0600 unix socket → write/verify → qemu-nbd exits
              → checkpoint bitmap (qemu-img bitmap) → rename <disk>.qcow2.partial → <disk>.qcow2
    incoming  qemu-img create → QEMU from launch.argv + ``-S -incoming defer``
              → nbd-server-start + block-export-add {writable} per disk → write/verify
              → checkpoint bitmaps (block-dirty-bitmap-add) → block-export-del, nbd-server-stop
              → left paused for its manager, or (--boot) quit and started normally

The job is a sequence of named steps; ``_Teardown`` undoes whatever was set up, in
reverse, when a step fails: no half-written image is left looking restored, and a
QEMU started for a failed restore is killed. Nothing is reported restored that was
not read back and verified against the backup's index.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from scheduler.config import DomainConfig, FleetConfig, LaunchConfig
from storage.errors import StorageError
from storage.repository import Manifest, Repository
from worker.checkpoints import bitmap_name
from worker.cleanup import qemu_id
from worker.errors import WorkerError
from worker.launch import (
    LaunchError,
    QemuProcess,
    ensure_qmp_free,
    private_socket_dir,
    render_argv,
    start_qemu,
)
from worker.locks import domain_lock
from worker.memory import chunk_friendly_malloc
from worker.nbd_write import NbdDiskWriter, VerifyError
from worker.progress import Progress
from worker.qmp import QmpSession

log = logging.getLogger(__name__)

# Bounded parallel prefetch from the repository: enough chunks in flight to hide S3
# latency, few enough that memory stays at a few dozen chunks per disk.
PREFETCH = 16
# Fetch threads. 8 GET as fast as 16 from the bench's SeaweedFS (843 vs 860 MiB/s) and
# kept the restore's peak RSS at 315 instead of 380 MiB. For file:// decompression is
# the work: a thread per core (up to 4).
FETCH_THREADS = 8
FILE_FETCH_THREADS = min(4, os.cpu_count() or 2)
_QEMU_NBD_START_TIMEOUT = 15.0
_QEMU_QUIT_TIMEOUT = 30.0
# Granularity of the post-restore checkpoint bitmap, as QEMU picks for qcow2 (cluster size).
_BITMAP_GRANULARITY = 64 * 1024


class RestoreError(WorkerError):
    """A restore could not be done as asked (bad request or a failed step). Not retryable."""


class BackupNotFoundError(RestoreError):
    """No backup matches the given id or time. Not retryable: pick another backup."""


class RestoreReadError(RestoreError):
    """The repository could not deliver a chunk (store unreachable). Retryable later."""


class RestoreTargetExistsError(RestoreError):
    """A target image exists (without ``force``) or is in use by a QEMU. Not retryable as is."""


@dataclass
class RestoredDisk:
    """One disk written and verified."""

    name: str
    path: Path
    virtual_size: int
    bytes_written: int
    verified: bool
    bytes_zero: int = 0
    duration_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "virtual_size": self.virtual_size,
            "bytes_written": self.bytes_written,
            "bytes_zero": self.bytes_zero,
            "verified": self.verified,
            "duration_s": round(self.duration_s, 3),
        }


@dataclass
class RestoreResult:
    """What a restore did; ``to_json`` is the CLI's ``--json`` document."""

    backup_id: str
    domain: str
    mode: str  # "files" or "incoming"
    disks: list[RestoredDisk]
    duration_s: float
    checkpoint: str | None = None
    qmp: Path | None = None
    qemu_pid: int | None = None
    booted: bool = False
    qemu_log: Path | None = None
    qemu: QemuProcess | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "backup_id": self.backup_id,
            "domain": self.domain,
            "mode": self.mode,
            "disks": [d.to_json() for d in self.disks],
            "bytes_written": sum(d.bytes_written for d in self.disks),
            "duration_s": round(self.duration_s, 3),
            "checkpoint": self.checkpoint,
        }
        if self.mode == "incoming":
            doc["qmp"] = str(self.qmp)
            doc["qemu_pid"] = self.qemu_pid
            doc["state"] = "running" if self.booted else "paused-incoming"
            doc["qemu_log"] = str(self.qemu_log)
        return doc


class _Teardown:
    """Undo actions registered as steps succeed; run in reverse when the job fails."""

    def __init__(self) -> None:
        self._actions: list[tuple[str, Callable[[], None]]] = []

    def push(self, what: str, action: Callable[[], None]) -> None:
        self._actions.append((what, action))

    def run(self) -> None:
        while self._actions:
            what, action = self._actions.pop()
            try:
                action()
            except Exception as err:  # teardown must go on; the job's own error wins
                log.warning("restore teardown: %s failed: %s", what, err)

    def forget(self) -> None:
        self._actions.clear()


# -- choosing what to restore ------------------------------------------------------------


def open_repo(config: FleetConfig) -> Repository:
    """The fleet's repository, opened for restoring."""
    repo_cfg = config.repository
    # Parallel GETs hide S3 latency; a local file system has none to hide, a thread per
    # core decompresses. Fewer threads also mean fewer malloc arenas holding freed chunk
    # buffers (see worker/memory.py).
    local = repo_cfg.url.startswith("file:")
    return repo_cfg.open(concurrency=FILE_FETCH_THREADS if local else FETCH_THREADS)


def select_backup(
    repo: Repository, domain: str, backup_id: str | None = None, at: datetime | None = None
) -> Manifest:
    """The manifest to restore: by id, the newest at or before ``at``, else the newest."""
    if backup_id is not None and at is not None:
        raise RestoreError("give either a backup id or a time (--backup or --at), not both")
    manifests = repo.list_manifests(domain)
    if backup_id is not None:
        for manifest in manifests:
            if manifest.backup_id == backup_id:
                return manifest
        known = ", ".join(m.backup_id for m in manifests[-3:]) or "none"
        raise BackupNotFoundError(
            f"domain {domain!r}: no backup {backup_id!r} in the repository"
            f" (newest: {known}; list them with 'vmvault backups {domain}')"
        )
    if not manifests:
        raise BackupNotFoundError(
            f"domain {domain!r}: the repository holds no backup of it yet (run 'vmvault backup"
            f" {domain}' first)"
        )
    if at is None:
        return manifests[-1]
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    candidates = [m for m in manifests if m.created <= at]
    if not candidates:
        first = manifests[0]
        raise BackupNotFoundError(
            f"domain {domain!r}: no backup at or before {at.isoformat()}; the first one is"
            f" {first.backup_id} from {first.created.isoformat()}"
        )
    return candidates[-1]


def restore_checkpoint_name(manifest: Manifest) -> str | None:
    """The bitmap that ties restored disks to ``manifest``: its checkpoint, starting a chain.

    A restored disk equals the backup exactly, so the writes after the restore are the
    changes since the backup's checkpoint; the bitmap has no ``^parent`` because no older
    checkpoint exists on the fresh image (worker/checkpoints.py naming).
    """
    if manifest.checkpoint is None:
        return None
    return bitmap_name(manifest.checkpoint, None)


def _select_disks(manifest: Manifest, wanted: list[str] | None) -> list[Any]:
    by_name = {d.name: d for d in manifest.disks}
    if not wanted:
        return list(manifest.disks)
    unknown = [name for name in wanted if name not in by_name]
    if unknown:
        raise RestoreError(
            f"backup {manifest.backup_id} of domain {manifest.domain!r} has no disk"
            f" {unknown[0]!r} (it has: {', '.join(by_name) or 'none'})"
        )
    return [by_name[name] for name in dict.fromkeys(wanted)]


def _check_targets(paths: list[Path], force: bool) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        raise RestoreTargetExistsError(
            f"{existing[0]} already exists: restore to another directory (--to) or pass --force"
            " to replace it"
        )
    for path in existing:
        # Even --force must not replace the disk of a running VM: QEMU holds an image lock.
        probe = subprocess.run(
            ["qemu-img", "info", "--output=json", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if probe.returncode != 0 and "lock" in probe.stderr.lower():
            raise RestoreTargetExistsError(
                f"{path} is in use (a QEMU holds its image lock): stop that VM first or"
                " restore to another directory (--to)"
            )


# -- images and qemu-nbd -------------------------------------------------------------------


def _run_tool(argv: list[str], what: str) -> None:
    try:
        subprocess.run(argv, check=True, capture_output=True, text=True)
    except FileNotFoundError as err:
        raise RestoreError(f"{what}: {argv[0]} not found (install qemu-utils)") from err
    except subprocess.CalledProcessError as err:
        detail = (err.stderr or err.stdout or "").strip()
        raise RestoreError(f"{what}: {' '.join(argv[:2])} failed: {detail}") from err


def create_image(path: Path, size: int) -> None:
    """A fresh, empty (all-zero, unallocated) qcow2 image of ``size`` bytes."""
    path.unlink(missing_ok=True)
    _run_tool(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=off",
            str(path),
            str(size),
        ],
        f"creating image {path}",
    )


def add_bitmap_offline(path: Path, bitmap: str) -> None:
    """A persistent, enabled dirty bitmap in a qcow2 that no process has open."""
    _run_tool(
        ["qemu-img", "bitmap", "--add", "-g", str(_BITMAP_GRANULARITY), str(path), bitmap],
        f"adding checkpoint bitmap {bitmap} to {path}",
    )


def supports_direct_io(path: Path) -> bool:
    """True when ``path``'s file system takes ``O_DIRECT`` (tmpfs, for one, does not)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    except OSError:
        return False
    os.close(fd)
    return True


def qemu_nbd_argv(path: Path, socket: Path, export: str) -> list[str]:
    """How restore serves a fresh image (bench/restore_bench.py gives nbdcopy the same).

    ``--cache=none --aio=native`` (O_DIRECT) where the file system allows it: the data
    goes to the file without a page-cache copy, and reading it back for verification
    reads the file, not a cached copy. That took qemu-nbd from 1.2-1.8 to 0.9 CPU-seconds
    per GiB restored here. Elsewhere (tmpfs) ``--cache=writeback``.
    """
    cache = ["--cache=none", "--aio=native"] if supports_direct_io(path) else ["--cache=writeback"]
    return [
        "qemu-nbd",
        "--format=qcow2",
        f"--socket={socket}",
        f"--export-name={export}",
        *cache,
        "--discard=unmap",
        str(path),
    ]


def qemu_nbd_env() -> dict[str, str]:
    """qemu-nbd's environment: glibc malloc tuned for its per-request bounce buffers.

    qemu-nbd allocates a buffer per request (4 MiB for a chunk). Above glibc's mmap
    threshold every such buffer is a fresh mmap, so each request faults in and zeroes a
    thousand pages, and munmaps them again. Serving them from the heap, and not trimming
    it, lets the buffers be reused: qemu-nbd went from 1.0 to 0.4 CPU-seconds per GiB
    restored here (bench/restore_bench.py gives nbdcopy's qemu-nbd the same).
    """
    return {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": str(64 * 1024 * 1024),
        "MALLOC_TRIM_THRESHOLD_": str(256 * 1024 * 1024),
    }


def durable(path: Path) -> None:
    """``fsync`` a file and its directory: what was written survives a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def serve_image(path: Path, socket: Path, export: str) -> Iterator[subprocess.Popen[bytes]]:
    """``qemu-nbd`` serving ``path`` writable on a 0600 unix socket, for one client.

    Without ``--persistent`` qemu-nbd exits once its client disconnects, after closing the
    image cleanly (qcow2 metadata written); we wait for that before the image is used.
    """
    argv = qemu_nbd_argv(path, socket, export)
    try:
        # umask 077: the socket is created 0600 (it lives in a 0700 directory anyway).
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            umask=0o077, start_new_session=True, env=qemu_nbd_env(),
        )  # fmt: skip
    except FileNotFoundError as err:
        raise RestoreError("qemu-nbd not found: install qemu-utils") from err
    try:
        deadline = time.monotonic() + _QEMU_NBD_START_TIMEOUT
        while not socket.exists():
            if proc.poll() is not None:
                stderr = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
                raise RestoreError(f"qemu-nbd for {path} exited early: {stderr}")
            if time.monotonic() > deadline:
                raise RestoreError(f"qemu-nbd for {path} did not create {socket} in time")
            time.sleep(0.01)
        os.chmod(socket, 0o600)
        yield proc
    finally:
        if proc.poll() is None:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


# -- the data path -------------------------------------------------------------------------


class _DiskProgress:
    """Maps each disk's write and verify progress onto one job-wide byte counter."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self._progress = progress
        self._total = max(1, 2 * total)  # every byte is written once and read back once
        self._base = 0

    def disk(self, name: str, size: int) -> Callable[[str, int, int], None]:
        base = self._base
        self._base += 2 * size
        done = {"write": 0, "verify": 0}

        def report(phase: str, value: int, total: int) -> None:
            # Writing and verifying interleave: report their sum, so the bar only grows.
            done[phase] = value
            if self._progress is not None:
                self._progress(
                    f"restore {name}", base + done["write"] + done["verify"], self._total
                )

        return report


def _reading(
    chunks: Iterator[tuple[int, bytes | None]],
    repo: Repository,
    manifest: Manifest,
    disk: Any,
    expected: list[str | None],
) -> Iterator[tuple[int, bytes | None]]:
    """The reader's chunks; a failure below the storage layer still names disk and offset.

    ``StorageError`` already says where (storage/repository.py ``read_disk``); a boto3 or
    OS error that the backend does not map to it is turned into ``RestoreReadError`` here
    rather than escaping as a traceback. The chunks come unchecked (``check=False``): a
    data chunk of the wrong length is blamed on the repository here, before it is written
    (it would overlap its neighbour); wrong content is caught by the read-back.
    """
    from botocore.exceptions import BotoCoreError

    cs = manifest.chunk_size
    offset = 0
    while True:
        try:
            item = next(chunks)
        except StopIteration:
            return
        except (BotoCoreError, OSError) as err:
            raise RestoreReadError(
                f"{manifest.domain} backup {manifest.backup_id} disk {disk.name} offset {offset}:"
                f" cannot read from the repository: {err}"
            ) from err
        offset, data = item
        if data is not None and len(data) != min(cs, disk.virtual_size - offset):
            _blame_repository(repo, manifest, disk.name, expected, offset)
            raise RestoreReadError(
                f"{manifest.domain} backup {manifest.backup_id} disk {disk.name} offset"
                f" {offset}: the repository gave a chunk of {len(data)} bytes"
            )
        offset += cs
        yield item


def _blame_repository(
    repo: Repository, manifest: Manifest, disk: str, expected: list[str | None], offset: int
) -> None:
    """Raise the repository's own error when the chunk at ``offset`` is damaged there.

    Chunks are written without re-hashing them first (the read-back compares every chunk
    with the index anyway); when a chunk fails, fetching it again with the digest check
    tells a damaged repository object (``CorruptObjectError``, a ``StorageError``, naming
    disk and offset) from a disk that did not keep what was written (``VerifyError``).
    """
    index = offset // manifest.chunk_size
    digest = expected[index] if 0 <= index < len(expected) else None
    if digest is None:
        return
    try:
        repo.read_chunk(digest)
    except StorageError as err:
        raise type(err)(
            f"{manifest.domain} backup {manifest.backup_id} disk {disk} offset {offset}: {err}"
        ) from err


def _restore_disk(
    repo: Repository,
    manifest: Manifest,
    disk: Any,
    socket: Path,
    export: str,
    progress: _DiskProgress,
) -> RestoredDisk:
    """Write one disk through an NBD export, flush, read back and verify every chunk."""
    started = time.monotonic()
    expected = repo.index_digests(manifest, disk.name)
    with NbdDiskWriter(socket, disk.name, export) as writer:
        if writer.size != disk.virtual_size:
            raise RestoreError(
                f"disk {disk.name}: the NBD target is {writer.size} bytes but backup"
                f" {manifest.backup_id} recorded {disk.virtual_size}"
            )
        # Written, flushed and read back in windows, so verification overlaps the writes.
        # The reader does not re-hash chunks: the read-back compares every chunk on the
        # disk with the index, which proves the repository's copy right as well (one
        # BLAKE3 pass per byte instead of two; a failure is then blamed precisely).
        chunks = repo.read_disk(manifest, disk.name, prefetch=PREFETCH, check=False)
        try:
            stats, _ = writer.write_and_verify(
                _reading(chunks, repo, manifest, disk, expected),
                manifest.chunk_size,
                expected,
                repo.chunk_digest,
                target_is_zero=True,
                progress=progress.disk(disk.name, disk.virtual_size),
            )
        except VerifyError as err:
            _blame_repository(repo, manifest, disk.name, expected, err.offset)
            raise
        # A last flush: nothing is reported restored before the server says it is stable.
        writer.flush()
    return RestoredDisk(
        name=disk.name,
        path=Path(),
        virtual_size=disk.virtual_size,
        bytes_written=stats.bytes_written,
        verified=True,
        bytes_zero=stats.bytes_skipped + stats.bytes_zeroed,
        duration_s=time.monotonic() - started,
    )


# -- the job ---------------------------------------------------------------------------------


def run_restore(
    config: FleetConfig,
    domain: str,
    backup_id: str | None = None,
    at: datetime | None = None,
    to_dir: Path | None = None,
    incoming: bool = False,
    boot: bool = False,
    force: bool = False,
    disks: list[str] | None = None,
    progress: Progress | None = None,
    *,
    qmp: Path | None = None,
    launch: LaunchConfig | None = None,
) -> RestoreResult:
    """Restore one backup of ``domain`` to image files (``to_dir``) or into the domain.

    Files: ``to_dir/<disk>.qcow2`` for every disk (or ``disks``). Incoming: fresh images
    in ``to_dir`` (default ``launch.image_dir``, else ``<state_dir>/images/<domain>``), a
    QEMU started paused in incoming mode from the domain's ``launch`` description, left
    paused (``boot=False``) or restarted normally (``boot=True``). Either way the restored
    images carry a checkpoint bitmap tied to the backup, so the next backup is incremental.

    ``qmp`` and ``launch`` override the domain's QMP socket and launch description for an
    incoming restore: a clone started next to the still-running domain (``vmvault demo``).
    """
    started = time.monotonic()
    domain_cfg = config.domain(domain)
    overrides = {k: v for k, v in (("qmp", qmp), ("launch", launch)) if v is not None}
    if overrides:
        domain_cfg = domain_cfg.model_copy(update=overrides)
    if boot and not incoming:
        raise RestoreError("--boot applies to --incoming restores only")
    if not incoming and to_dir is None:
        raise RestoreError("say where to restore: --to DIR (image files) or --incoming (domain)")
    if to_dir is not None:
        # QEMU's node file names are compared with these paths: make them absolute.
        to_dir = to_dir.absolute()
    if incoming and domain_cfg.launch is None:
        raise RestoreError(
            f"domain {domain!r} has no launch description: add domains.{domain}.launch.argv"
            " to the config (see docs/restore.md) to restore into the domain"
        )
    with chunk_friendly_malloc(), open_repo(config) as repo:
        return _run(config, domain, domain_cfg, repo, backup_id, at, to_dir, incoming, boot,
                    force, disks, progress, started)  # fmt: skip


def _run(
    config: FleetConfig,
    domain: str,
    domain_cfg: DomainConfig,
    repo: Repository,
    backup_id: str | None,
    at: datetime | None,
    to_dir: Path | None,
    incoming: bool,
    boot: bool,
    force: bool,
    disks: list[str] | None,
    progress: Progress | None,
    started: float,
) -> RestoreResult:
    manifest = select_backup(repo, domain, backup_id, at)
    chosen = _select_disks(manifest, disks)
    if incoming:
        assert domain_cfg.launch is not None
        default_dir = domain_cfg.launch.image_dir or config.state_dir / "images" / domain
        target_dir = to_dir or default_dir
    else:
        assert to_dir is not None
        target_dir = to_dir
    paths = {d.name: target_dir / f"{d.name}.qcow2" for d in chosen}
    _check_targets(list(paths.values()), force)
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RestoreError(f"cannot create target directory {target_dir}: {err.strerror}") from err
    checkpoint = restore_checkpoint_name(manifest)
    if checkpoint is None:
        log.warning(
            "backup %s of %s records no checkpoint: the next backup after this restore is full",
            manifest.backup_id,
            domain,
        )
    meter = _DiskProgress(progress, sum(d.virtual_size for d in chosen))
    with domain_lock(config.state_dir, domain, job="restore"):
        if incoming:
            result = _restore_incoming(
                config, domain, domain_cfg, repo, manifest, chosen, paths, checkpoint, boot, meter
            )
        else:
            result = _restore_files(config, repo, manifest, chosen, paths, checkpoint, meter)
    result.duration_s = time.monotonic() - started
    return result


def _restore_files(
    config: FleetConfig,
    repo: Repository,
    manifest: Manifest,
    chosen: list[Any],
    paths: dict[str, Path],
    checkpoint: str | None,
    meter: _DiskProgress,
) -> RestoreResult:
    """Each disk into ``<disk>.qcow2.partial`` via qemu-nbd; renamed only once verified."""
    teardown = _Teardown()
    restored: list[RestoredDisk] = []
    sockdir = private_socket_dir(config.state_dir / "run", "vmvr")
    teardown.push("remove socket directory", lambda: shutil.rmtree(sockdir, ignore_errors=True))
    try:
        partials: list[tuple[Path, Path]] = []
        for disk in chosen:
            final = paths[disk.name]
            partial = final.with_name(final.name + ".partial")
            create_image(partial, disk.virtual_size)
            teardown.push(f"remove {partial}", functools.partial(partial.unlink, missing_ok=True))
            socket = sockdir / f"{disk.name}.nbd"
            with serve_image(partial, socket, disk.name):
                done = _restore_disk(repo, manifest, disk, socket, disk.name, meter)
            socket.unlink(missing_ok=True)
            # The post-restore checkpoint: the image now equals the backup exactly.
            if checkpoint is not None:
                add_bitmap_offline(partial, checkpoint)
            # NBD flushes made the data stable; this covers the bitmap qemu-img just added.
            durable(partial)
            done.path = final
            restored.append(done)
            partials.append((partial, final))
        # Only verified images get their final names, and only once all disks are done.
        for partial, final in partials:
            os.replace(partial, final)
        if partials:
            durable(partials[0][1])  # the renames, by fsync of the directory
    except BaseException:
        teardown.run()
        raise
    shutil.rmtree(sockdir, ignore_errors=True)
    return RestoreResult(
        backup_id=manifest.backup_id,
        domain=manifest.domain,
        mode="files",
        disks=restored,
        duration_s=0.0,
        checkpoint=checkpoint,
    )


def _format_node(session: QmpSession, domain: str, disk: str, path: Path) -> str:
    """The node name of the format (qcow2) node QEMU opened ``path`` with."""
    nodes = [n for n in session.named_block_nodes() if n.file == str(path)]
    for node in nodes:
        if node.driver == "qcow2":
            return node.node_name
    raise RestoreError(
        f"domain {domain!r}: QEMU has no qcow2 node for disk {disk} ({path}): make"
        f" launch.argv open {{disk:{disk}}} with driver=qcow2"
    )


def _restore_incoming(
    config: FleetConfig,
    domain: str,
    domain_cfg: DomainConfig,
    repo: Repository,
    manifest: Manifest,
    chosen: list[Any],
    paths: dict[str, Path],
    checkpoint: str | None,
    boot: bool,
    meter: _DiskProgress,
) -> RestoreResult:
    assert domain_cfg.launch is not None
    launch = domain_cfg.launch
    qmp_path = domain_cfg.qmp
    argv = render_argv(domain, launch, qmp_path, paths, incoming=True)
    log_path = config.state_dir / "logs" / f"{domain}.qemu.log"
    # Before any image is replaced (--force): a running domain must not lose its files to a
    # restore that start_qemu would refuse anyway.
    ensure_qmp_free(domain, qmp_path)
    teardown = _Teardown()
    restored: list[RestoredDisk] = []
    # --force: the old images are moved aside, not deleted, until the restore is verified;
    # a failed restore puts them back (teardown) instead of leaving the domain without disks.
    aside: list[Path] = []
    try:
        for disk in chosen:
            image = paths[disk.name]
            if image.exists():
                old = image.with_name(image.name + ".pre-restore")
                if old.exists():
                    raise RestoreTargetExistsError(
                        f"{old} exists (left by an interrupted restore): move it away or"
                        f" delete it, then restore again"
                    )
                os.replace(image, old)
                aside.append(old)
                teardown.push(f"put back {image}", functools.partial(os.replace, old, image))
            create_image(image, disk.virtual_size)
            teardown.push(f"remove {image}", functools.partial(image.unlink, missing_ok=True))
        qemu = start_qemu(domain, argv, qmp_path, log_path)
        teardown.push("kill QEMU", qemu.kill)
        sockdir = private_socket_dir(config.state_dir / "run", "vmvr")
        teardown.push("remove socket directory", lambda: shutil.rmtree(sockdir, ignore_errors=True))
        socket = sockdir / "nbd.sock"
        session = QmpSession(domain, qmp_path)
        session.connect()
        teardown.push("close QMP session", session.close)
        status = session.query_status()
        if status != "inmigrate":
            raise RestoreError(
                f"domain {domain!r}: QEMU started in state {status!r}, not 'inmigrate'"
            )
        nodes = {d.name: _format_node(session, domain, d.name, paths[d.name]) for d in chosen}
        session.nbd_server_start(socket)
        teardown.push("nbd-server-stop", session.nbd_server_stop)
        os.chmod(socket, 0o600)
        for disk in chosen:
            export_id = qemu_id("r", disk.name)
            # A writable export activates the node that -incoming left inactive (QEMU 7.2+).
            session.block_export_add(export_id, nodes[disk.name], disk.name, [], writable=True)
            teardown.push(
                f"block-export-del {export_id}", functools.partial(_export_del, session, export_id)
            )
            done = _restore_disk(repo, manifest, disk, socket, disk.name, meter)
            done.path = paths[disk.name]
            restored.append(done)
        # Checkpoint bitmaps before any guest write: the next backup diffs from this backup.
        for disk in chosen if checkpoint is not None else []:
            session.bitmap_add(
                nodes[disk.name], str(checkpoint), persistent=True, granularity=_BITMAP_GRANULARITY
            )
        for disk in chosen:
            session.block_export_del(qemu_id("r", disk.name))
        session.nbd_server_stop()
        shutil.rmtree(sockdir, ignore_errors=True)
        if boot:
            # ``quit`` closes the images cleanly (persistent bitmaps stored in the qcow2).
            session.execute("quit")
            session.close()
            if qemu.wait(_QEMU_QUIT_TIMEOUT) is None:
                raise RestoreError(f"domain {domain!r}: QEMU did not quit after the restore")
            # From here on the images are restored and verified: keep them whatever happens.
            teardown.forget()
            _remove_all(aside)
            try:
                qemu = start_qemu(domain, launch.render(qmp_path, paths), qmp_path, log_path)
            except LaunchError as err:
                images = ", ".join(str(p) for p in paths.values())
                raise LaunchError(
                    f"backup {manifest.backup_id} was restored and verified into {images},"
                    f" but starting the domain normally failed: {err}"
                ) from err
        else:
            session.close()
    except BaseException:
        teardown.run()
        raise
    teardown.forget()
    _remove_all(aside)
    return RestoreResult(
        backup_id=manifest.backup_id,
        domain=domain,
        mode="incoming",
        disks=restored,
        duration_s=0.0,
        checkpoint=checkpoint,
        qmp=qmp_path,
        qemu_pid=qemu.pid,
        booted=boot,
        qemu_log=log_path,
        qemu=qemu,
    )


def _export_del(session: QmpSession, export_id: str) -> None:
    if any(e.get("id") == export_id for e in session.block_exports()):
        session.block_export_del(export_id)


def _remove_all(paths: list[Path]) -> None:
    """Delete the old images a verified restore replaced (a failure here only costs space)."""
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as err:
            log.warning("restore: cannot remove the replaced image %s: %s", path, err)
