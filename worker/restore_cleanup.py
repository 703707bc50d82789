"""A restore's journal of what it set up, and the removal of a dead restore's leftovers.

A restore writes ``<state_dir>/run/restore-<domain>.json`` (the journal) while it holds the
domain lock, and saves it *before* each thing it creates: a temporary image, a socket
directory, an image moved aside. A process it starts is found through the socket
directory its command line names (saved before the start) and, once started, by pid and
process start time. The journal is removed when the restore ends, either way.

A journal that exists while the domain lock can be taken belongs to a dead restore
(SIGKILL, a crash, a power loss): the kernel drops an ``flock`` with its holder.
``remove_restore_leftovers`` then undoes what it names:

    phase        the restore was                          undo
    writing      writing/verifying <disk>.qcow2.partial   kill its QEMU / qemu-nbd, delete partials
    committing   moving old images to .pre-restore and    put each old image back under its
                 renaming partials to their final names   name (dropping the restored one), or
                                                          delete a final that had no old image
    committed    done: final names hold verified images   delete the .pre-restore copies

and in every phase removes its ``vmvr-<domain>-*`` socket directories. The final names
never hold unverified data, so nothing here ever deletes a file the journal does not name,
and a process is killed only when its pid still has the start time that was recorded (or
its command line names the restore's private socket directory).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import stat
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vmvault.worker.config import FleetConfig
from vmvault.worker.errors import WorkerError
from vmvault.worker.locks import DomainBusyError, domain_lock
from vmvault.worker.qmp import socket_is_listening

log = logging.getLogger(__name__)

JOURNAL_VERSION = 1
WRITING, COMMITTING, COMMITTED = "writing", "committing", "committed"
SOCKET_DIR_PREFIX = "vmvr"
_KILL_WAIT = 30.0
# sockaddr_un.sun_path is 108 bytes including the terminating NUL; the longest socket name
# a restore puts in its directory is "qmp" / "nbd" / "d<index>.nbd".
_MAX_SOCKET_PATH = 107
_SOCKET_NAME_ROOM = 12
# A socket directory of the naming before journals (``vmvr`` + 8 random characters) is
# removed only when nothing listens in it and it has not changed for this long.
_OLD_DIR_AGE = 600.0
_OLD_DIR_RE = re.compile(r"^vmvr[a-z0-9_]{8}$")


class RestoreCleanupError(WorkerError):
    """Some leftovers of a dead restore could not be removed (named). Retryable."""

    retryable = True


def run_dir(state_dir: Path) -> Path:
    return state_dir / "run"


def journal_path(state_dir: Path, domain: str) -> Path:
    """Where the restore of ``domain`` keeps its journal."""
    return run_dir(state_dir) / f"restore-{domain}.json"


def make_private_dir(path: Path) -> bool:
    """``mkdir`` 0700 (whatever the umask); False when it existed, which keeps its mode."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        return False
    os.chmod(path, 0o700)
    return True


def process_start_time(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks after boot), None when it is gone.

    A pid can be reused; pid and start time together name one process (``proc(5)``,
    ``/proc/<pid>/stat`` field 22). A zombie counts as gone.
    """
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


@dataclass
class JournalProcess:
    """A process the restore started: QEMU or qemu-nbd."""

    what: str
    pid: int
    start_time: int


@dataclass
class JournalDisk:
    """One disk's files: the final name, its temporary name, and where the old image went."""

    name: str
    final: str
    partial: str
    aside: str | None = None


@dataclass
class RestoreJournal:
    """What one restore has set up; ``save`` runs before each thing is created."""

    state_dir: Path
    domain: str
    mode: str
    phase: str = WRITING
    pid: int = field(default_factory=os.getpid)
    disks: list[JournalDisk] = field(default_factory=list)
    socket_dirs: list[str] = field(default_factory=list)
    processes: list[JournalProcess] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return journal_path(self.state_dir, self.domain)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": JOURNAL_VERSION,
            "domain": self.domain,
            "mode": self.mode,
            "phase": self.phase,
            "pid": self.pid,
            "disks": [asdict(d) for d in self.disks],
            "socket_dirs": self.socket_dirs,
            "processes": [asdict(p) for p in self.processes],
        }

    @classmethod
    def load(cls, state_dir: Path, domain: str) -> RestoreJournal | None:
        """The journal of a restore of ``domain``, None when there is none."""
        path = journal_path(state_dir, domain)
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise RestoreCleanupError(
                f"domain {domain!r}: cannot read the restore journal {path}: {err}; look at the"
                f" files it names, then delete it"
            ) from err
        if doc.get("version") != JOURNAL_VERSION:
            raise RestoreCleanupError(
                f"domain {domain!r}: restore journal {path} has version {doc.get('version')!r},"
                f" this vmvault reads {JOURNAL_VERSION}: clean up with the vmvault that wrote it"
            )
        return cls(
            state_dir=state_dir,
            domain=domain,
            mode=str(doc["mode"]),
            phase=str(doc["phase"]),
            pid=int(doc["pid"]),
            disks=[JournalDisk(**d) for d in doc["disks"]],
            socket_dirs=[str(s) for s in doc["socket_dirs"]],
            processes=[JournalProcess(**p) for p in doc["processes"]],
        )

    def save(self) -> None:
        """Write the journal durably (temporary file, fsync, rename, fsync of the directory)."""
        path = self.path
        if make_private_dir(path.parent):
            log.debug("created %s", path.parent)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps(self.to_json(), indent=1).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            fsync_dir(self.path.parent)

    # -- records, each saved before the thing it names is created ------------------------

    def add_disk(self, name: str, final: Path, partial: Path) -> None:
        self.disks.append(JournalDisk(name, str(final), str(partial)))
        self.save()

    def new_socket_dir(self) -> Path:
        """A new 0700 directory for unix sockets, recorded before it is made.

        ``<state_dir>/run/vmvr-<domain>-<random>``; under the system's temporary directory
        when that path would be too long for a socket inside (``sun_path``).
        """
        token = secrets.token_hex(8)
        name = f"{SOCKET_DIR_PREFIX}-{self.domain}-{token}"
        path = run_dir(self.state_dir) / name
        if len(str(path)) + _SOCKET_NAME_ROOM > _MAX_SOCKET_PATH:
            path = Path("/tmp") / name
            if len(str(path)) + _SOCKET_NAME_ROOM > _MAX_SOCKET_PATH:
                path = Path("/tmp") / f"{SOCKET_DIR_PREFIX}-{token}"
        self.socket_dirs.append(str(path))
        self.save()
        make_private_dir(path.parent)
        path.mkdir(mode=0o700)
        return path

    def add_process(self, what: str, pid: int) -> None:
        start = process_start_time(pid)
        if start is not None:
            self.processes.append(JournalProcess(what, pid, start))
            self.save()

    def set_phase(self, phase: str) -> None:
        self.phase = phase
        self.save()


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (renames, removals) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- removing a dead restore's leftovers ------------------------------------------------------


def remove_restore_leftovers(config: FleetConfig, domain: str) -> list[str]:
    """Undo what a dead restore of ``domain`` left behind; what was removed, for the log.

    Dead means its domain lock can be taken: while a restore (or backup) of the domain
    runs, this returns ``[]`` at once and touches nothing. With nothing to clean (no
    journal, no socket directory) the lock is not even taken, so a periodic reaper does
    not make a starting job see the domain busy. Raises ``RestoreCleanupError`` when a
    leftover could not be removed (it stays recorded: the next call tries again).
    """
    state_dir = config.state_dir
    if not journal_path(state_dir, domain).exists() and not _stray_socket_dirs(state_dir, domain):
        return []
    try:
        with domain_lock(state_dir, domain, job="restore cleanup"):
            return remove_leftovers_locked(state_dir, domain)
    except DomainBusyError:
        return []


def remove_leftovers_locked(state_dir: Path, domain: str) -> list[str]:
    """``remove_restore_leftovers`` for a caller that holds the domain lock already."""
    done: list[str] = []
    journal = RestoreJournal.load(state_dir, domain)
    if journal is not None:
        undo(journal, done)
    for path in _stray_socket_dirs(state_dir, domain):
        shutil.rmtree(path, ignore_errors=True)
        done.append(f"removed socket directory {path}")
    if done:
        log.warning("domain %s: removed the leftovers of an earlier restore: %s",
                    domain, "; ".join(done))  # fmt: skip
    return done


def undo(journal: RestoreJournal, done: list[str]) -> None:
    """Undo what ``journal`` names (see the module docstring), then remove the journal.

    Also the teardown of a failing restore in its own process: one way to undo, tested
    by every failure. Appends what it did to ``done``; raises ``RestoreCleanupError`` after
    trying everything when something could not be undone (the journal is then kept).
    """
    problems: list[str] = []

    def attempt(what: str, action: Any, *args: Any) -> None:
        try:
            action(*args)
            done.append(what)
        except FileNotFoundError:
            pass
        except OSError as err:
            problems.append(f"{what}: {err}")

    for proc in journal.processes:
        if _kill_if_same(proc):
            done.append(f"killed {proc.what} pid {proc.pid}")
    for sockdir in journal.socket_dirs:
        for pid in _processes_naming(sockdir):
            _kill_and_wait(pid)
            done.append(f"killed pid {pid} (it used {sockdir})")
    for disk in journal.disks:
        final, partial = Path(disk.final), Path(disk.partial)
        aside = Path(disk.aside) if disk.aside else None
        if journal.phase == COMMITTING:
            if aside is not None and aside.exists():
                # The old image goes back under its name, over a restored one if it got there.
                attempt(f"put back {final} from {aside}", os.replace, aside, final)
            elif aside is None and not partial.exists() and final.exists():
                # Renamed from our verified partial, with no old image to bring back: a
                # failed restore leaves no target file.
                attempt(f"removed {final} (restore not finished)", final.unlink)
        elif journal.phase == COMMITTED and aside is not None:
            attempt(f"removed {aside} (replaced by the restore)", aside.unlink)
        elif aside is not None and aside.exists() and not final.exists():
            attempt(f"put back {final} from {aside}", os.replace, aside, final)
        if partial.exists():
            attempt(f"removed {partial}", partial.unlink)
    with contextlib.suppress(OSError):
        for parent in {Path(d.final).parent for d in journal.disks}:
            if parent.exists():
                fsync_dir(parent)
    for sockdir in journal.socket_dirs:
        if os.path.lexists(sockdir):
            shutil.rmtree(sockdir, ignore_errors=True)
            done.append(f"removed socket directory {sockdir}")
    if problems:
        raise RestoreCleanupError(
            f"domain {journal.domain!r}: could not undo all of an earlier restore"
            f" ({journal.path}): {'; '.join(problems)}"
        )
    journal.remove()


def _kill_if_same(proc: JournalProcess) -> bool:
    """SIGKILL ``proc`` if its pid still names the process that was recorded."""
    if process_start_time(proc.pid) != proc.start_time:
        return False
    _kill_and_wait(proc.pid, proc.start_time)
    return True


def _kill_and_wait(pid: int, start_time: int | None = None) -> None:
    """SIGKILL and wait until the process is gone (a zombie counts as gone)."""
    start_time = start_time if start_time is not None else process_start_time(pid)
    if start_time is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + _KILL_WAIT
    while process_start_time(pid) == start_time and time.monotonic() < deadline:
        time.sleep(0.02)
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)  # reap it when it was our own child


def _processes_naming(path: str) -> list[int]:
    """Processes (not this one) whose command line names ``path`` or a file in it."""
    found = []
    wanted = path.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(wanted + b"/" in arg or arg.endswith(wanted) for arg in args):
            found.append(int(entry.name))
    return found


def _stray_socket_dirs(state_dir: Path, domain: str) -> list[Path]:
    """Socket directories of dead restores that no journal names any more.

    ``vmvr-<domain>-<16 hex>`` is the domain's (the caller holds its lock, so no restore
    of it is running); a directory of the naming before journals is nobody's in
    particular and removed only when nothing listens in it and it is old.
    """
    run = run_dir(state_dir)
    try:
        entries = list(run.iterdir())
    except OSError:
        return []
    ours = re.compile(rf"^{SOCKET_DIR_PREFIX}-{re.escape(domain)}-[0-9a-f]{{16}}$")
    found = []
    now = time.time()
    for entry in entries:
        try:
            info = entry.lstat()
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode):
            continue
        if ours.match(entry.name) or (
            _OLD_DIR_RE.match(entry.name)
            and now - info.st_mtime > _OLD_DIR_AGE
            and not any(socket_is_listening(p) for p in _entries(entry))
        ):
            found.append(entry)
    return found


def _entries(path: Path) -> list[Path]:
    try:
        return list(path.iterdir())
    except OSError:
        return []
