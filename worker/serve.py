"""Serving one backup's disks as read-only NBD exports (``vmvault serve``), through nbdkit.

One nbdkit process serves every selected disk of one backup, each as an export named
after the disk, on one unix socket (created 0600) or one TCP address:

    vmvault serve ──starts──▶ nbdkit --foreground --exit-with-parent --readonly
         │                      python worker/nbdkit_plugin.py config=… backup=… disk=…
         │  shared lease                   │ (reads regions, checks digests, caches)
         ▼                                 ▼
    locks/<id>.json              nbd+unix:///vda?socket=PATH   nbd+unix:///vdb?socket=PATH

The backup is chosen here (``--backup``/``--at``, as restore does) and passed to the
plugin by id, so every export shows the same backup. While nbdkit runs this process
holds a *shared* repository lease, as a backup in flight does: GC (exclusive) cannot
run and delete the chunks and packs the exports read. On SIGTERM/SIGINT nbdkit is
stopped, the socket removed and the lease released; if this process is killed outright
nbdkit exits with it (``--exit-with-parent``) and the lease lapses (storage/locks.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import vmvault
from vmvault.storage.format import Manifest
from vmvault.storage.locks import Lease
from vmvault.storage.repository import Repository
from vmvault.worker import nbdkit_plugin
from vmvault.worker.config import FleetConfig
from vmvault.worker.errors import ServeError
from vmvault.worker.restore_select import open_repo, select_backup, select_disks
from vmvault.worker.signals import critical

log = logging.getLogger(__name__)

READY_TIMEOUT = 60.0
# nbdkit 1.32 does not end on SIGTERM while a client keeps a connection open (its
# connection thread sits in read()). Exports are read-only, nothing is lost by cutting
# them: after this grace nbdkit gets SIGKILL.
STOP_GRACE = 2.0
# sun_path holds 108 bytes including the final NUL.
MAX_SOCKET_PATH = 107
DEFAULT_CACHE_MIB = nbdkit_plugin.DEFAULT_CACHE_BYTES // 2**20


@dataclass(frozen=True)
class Listen:
    """Where nbdkit listens: a unix socket path, or a TCP host and port."""

    socket: Path | None = None
    host: str | None = None
    port: int | None = None

    @staticmethod
    def parse_tcp(text: str) -> Listen:
        """``HOST:PORT`` (``[::1]:10809`` for IPv6)."""
        host, sep, port_text = text.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ServeError(f"--listen {text!r}: use HOST:PORT, e.g. 127.0.0.1:10809")
        return Listen(host=host, port=int(port_text))

    def uri(self, export: str) -> str:
        name = quote(export, safe="")
        if self.socket is not None:
            return f"nbd+unix:///{name}?socket={quote(str(self.socket), safe='/')}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{name}"

    def nbdkit_args(self) -> list[str]:
        if self.socket is not None:
            return ["--unix", str(self.socket)]
        return ["--ipaddr", str(self.host), "--port", str(self.port)]


@dataclass(frozen=True)
class ServedDisk:
    name: str
    virtual_size: int
    uri: str


@dataclass(frozen=True)
class ServeInfo:
    """What is being served; printed once nbdkit accepts connections."""

    domain: str
    backup_id: str
    created: datetime
    disks: list[ServedDisk]
    pid: int  # nbdkit's
    socket: str | None
    listen: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "backup_id": self.backup_id,
            "created": self.created.isoformat(),
            "socket": self.socket,
            "listen": self.listen,
            "nbdkit_pid": self.pid,
            "exports": [
                {"disk": d.name, "virtual_size": d.virtual_size, "uri": d.uri} for d in self.disks
            ],
        }


def serve(
    config: FleetConfig,
    config_file: Path,
    domain: str,
    listen: Listen,
    on_ready: Callable[[ServeInfo], None],
    backup_id: str | None = None,
    at: datetime | None = None,
    disks: list[str] | None = None,
    cache_mib: int = DEFAULT_CACHE_MIB,
) -> None:
    """Serve the chosen backup until SIGTERM/SIGINT (raised as exceptions by the CLI's
    ``signals_as_exceptions``) or until nbdkit exits; ``ServeError`` in the latter case."""
    with exported(config, config_file, domain, listen, backup_id, at, disks, cache_mib) as export:
        on_ready(export.info)
        _watch(export.proc, export.lease, export.tail)


@dataclass
class Export:
    """A running nbdkit serving one backup, as ``exported`` yields it."""

    info: ServeInfo
    manifest: Manifest
    proc: subprocess.Popen[bytes]
    lease: Lease
    tail: deque[str]

    def check(self) -> None:
        """``ServeError`` if nbdkit has exited (a client's read error is then explained)."""
        code = self.proc.poll()
        if code is not None:
            raise ServeError(f"nbdkit exited with code {code}: {_last_error(self.tail)}")


@contextlib.contextmanager
def exported(
    config: FleetConfig,
    config_file: Path,
    domain: str,
    listen: Listen,
    backup_id: str | None = None,
    at: datetime | None = None,
    disks: list[str] | None = None,
    cache_mib: int = DEFAULT_CACHE_MIB,
) -> Iterator[Export]:
    """nbdkit serving the chosen backup's disks, ready for clients, for the ``with`` block;
    then stopped, the socket removed and the lease released (``vmvault files`` reads
    through it too)."""
    nbdkit = shutil.which("nbdkit")
    if nbdkit is None:
        raise ServeError(
            "nbdkit is not installed: install the Debian packages nbdkit and"
            " nbdkit-plugin-python (make setup does)"
        )
    if cache_mib < 1:
        raise ServeError(f"--cache-mib {cache_mib}: give at least 1 (MiB)")
    check_socket(listen)
    with contextlib.ExitStack() as stack:
        repo = open_repo(config)
        stack.callback(repo.close)
        manifest = select_backup(repo, domain, backup_id, at)
        chosen = [d.name for d in select_disks(manifest, disks)]
        lease = take_lease(repo, manifest)
        stack.callback(release, lease)
        proc, tail = start_nbdkit(
            stack,
            config_file,
            domain,
            manifest.backup_id,
            chosen,
            listen,
            cache_mib,
            repository=config.repository_name,
        )
        info = ServeInfo(
            domain=domain,
            backup_id=manifest.backup_id,
            created=manifest.created,
            disks=[ServedDisk(n, manifest.disk(n).virtual_size, listen.uri(n)) for n in chosen],
            pid=proc.pid,
            socket=str(listen.socket) if listen.socket is not None else None,
            listen=f"{listen.host}:{listen.port}" if listen.socket is None else None,
        )
        log.info("serving backup %s of %s: nbdkit pid %d", manifest.backup_id, domain, proc.pid)
        yield Export(info, manifest, proc, lease, tail)


def start_nbdkit(
    stack: contextlib.ExitStack,
    config_file: Path,
    domain: str,
    backup_id: str,
    disks: list[str],
    listen: Listen,
    cache_mib: int = DEFAULT_CACHE_MIB,
    repository: str | None = None,
) -> tuple[subprocess.Popen[bytes], deque[str]]:
    """Start nbdkit serving ``disks`` of one backup on ``listen``; return once it accepts
    connections. ``stack`` stops it (and removes its socket) when it closes; the caller
    holds the repository lease. Also how a live restore (re)starts its server."""
    nbdkit = shutil.which("nbdkit")
    if nbdkit is None:
        raise ServeError(
            "nbdkit is not installed: install the Debian packages nbdkit and"
            " nbdkit-plugin-python (make setup does)"
        )
    work = Path(tempfile.mkdtemp(prefix="vmvault-serve-"))
    stack.callback(shutil.rmtree, work, True)
    pidfile = work / "nbdkit.pid"
    argv = [
        nbdkit,
        "--foreground",
        "--exit-with-parent",
        "--readonly",
        "--pidfile",
        str(pidfile),
        *listen.nbdkit_args(),
        "python",
        str(Path(nbdkit_plugin.__file__).resolve()),
        f"config={config_file.resolve()}",
        *([f"repository={repository}"] if repository is not None else []),
        f"domain={domain}",
        f"backup={backup_id}",
        *(f"disk={name}" for name in disks),
        f"cache={cache_mib * 2**20}",
    ]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=_plugin_env(),
        # The unix socket nbdkit creates is 0600: only this user reads the backup.
        umask=0o077,
    )
    stack.callback(stop_nbdkit, proc, listen)
    tail = _forward_stderr(proc.stderr)
    _wait_ready(proc, pidfile, tail)
    if listen.socket is not None:
        os.chmod(listen.socket, 0o600)  # whatever nbdkit's own default becomes
    return proc, tail


def check_socket(listen: Listen) -> None:
    path = listen.socket
    if path is None:
        return
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ServeError(f"--socket {path}: path too long for a unix socket (max 107 bytes)")
    if not path.parent.is_dir():
        raise ServeError(f"--socket {path}: directory {path.parent} does not exist")
    if _stale_socket(path):
        # Left by a serve that was killed (SIGKILL, OOM): nobody listens on it any more.
        log.warning("removing stale socket %s (nothing listens on it)", path)
        path.unlink()
    if path.exists() or path.is_symlink():
        raise ServeError(
            f"--socket {path} already exists: another server may use it; remove it or"
            " choose another path"
        )


def _stale_socket(path: Path) -> bool:
    """True when ``path`` is a unix socket nobody accepts connections on."""
    try:
        if not stat.S_ISSOCK(path.lstat().st_mode):
            return False
    except FileNotFoundError:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            return True
        except OSError:
            return False
    return False


def take_lease(repo: Repository, manifest: Manifest) -> Lease:
    """A shared lease (GC waits), then a check that the backup still exists under it: a
    prune and GC may have removed it between choosing it and taking the lease."""
    lease = repo.lease_on(manifest, f"serve {manifest.domain}/{manifest.backup_id}")
    if lease is None:
        raise ServeError(
            f"backup {manifest.backup_id} of {manifest.domain} was pruned meanwhile:"
            f" serve another one ('vmvault list {manifest.domain}')"
        )
    return lease


def release(lease: Lease) -> None:
    with critical():
        lease.release()


def _plugin_env() -> dict[str, str]:
    """nbdkit's embedded Python must import vmvault and its dependencies exactly as this
    process does: the same search path (the checkout of an editable install first)."""
    root = str(Path(vmvault.__file__).resolve().parent.parent)
    paths = [root, *(p for p in sys.path if p)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def _forward_stderr(stream: IO[bytes] | None) -> deque[str]:
    """Copy nbdkit's stderr to ours (damage reports name backup, disk and offset); keep
    the last lines for an error message if it fails to start."""
    tail: deque[str] = deque(maxlen=20)
    if stream is None:
        return tail

    def pump() -> None:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            tail.append(line)
            print(line, file=sys.stderr, flush=True)

    threading.Thread(target=pump, name="nbdkit-stderr", daemon=True).start()
    return tail


def _last_error(tail: deque[str]) -> str:
    for line in reversed(tail):
        if "error" in line.lower():
            return line
    return tail[-1] if tail else "(no message)"


def _wait_ready(proc: subprocess.Popen[bytes], pidfile: Path, tail: deque[str]) -> None:
    """Until nbdkit writes its pidfile (it does once it accepts connections)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            time.sleep(0.1)  # let the stderr pump catch the last lines
            raise ServeError(f"nbdkit exited with code {code} at start: {_last_error(tail)}")
        with contextlib.suppress(OSError):
            if pidfile.read_text().strip():
                return
        time.sleep(0.05)
    raise ServeError(f"nbdkit did not become ready within {READY_TIMEOUT:.0f}s")


def _watch(proc: subprocess.Popen[bytes], lease: Lease, tail: deque[str]) -> None:
    """Serve until a signal (an exception out of ``wait``) or until nbdkit exits."""
    warned = False
    while True:
        try:
            code = proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            if lease.lapsed and not warned:
                warned = True
                log.warning(
                    "lease %s lapsed for a while: a GC may have run; reads of deleted"
                    " objects fail (never return wrong bytes)",
                    lease.key,
                )
            continue
        raise ServeError(f"nbdkit exited with code {code}: {_last_error(tail)}")


def stop_nbdkit(proc: subprocess.Popen[bytes], listen: Listen) -> None:
    """Stop nbdkit (SIGTERM, then SIGKILL after ``STOP_GRACE``) and remove its socket."""
    with critical():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                log.info("nbdkit pid %d still has clients: disconnecting them", proc.pid)
                proc.kill()
                proc.wait()
        path = listen.socket
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()
