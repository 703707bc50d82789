"""A domain libvirt manages: a thin, typed facade over ``python3-libvirt`` for backups.

Only the calls a backup and a restore need: the disks the domain XML names, the
job libvirt runs on the domain, checkpoints (``virDomainCheckpoint*``) and the pull-mode
backup job (``virDomainBackupBegin`` / ``virDomainAbortJob``). libvirt owns the QEMU,
its monitor and the bitmaps behind checkpoints: nothing here talks QMP.

python3-libvirt is a Debian package (not on PyPI); the venv sees it through
``--system-site-packages``. It is imported when a libvirt domain is first used, so
QMP-only hosts do not need it.
"""

from __future__ import annotations

import contextlib
import logging
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from vmvault.worker.errors import WorkerError

log = logging.getLogger(__name__)

# virDomainJobOperation (libvirt-domain.h): what a running job is doing, for messages.
_OPERATIONS = {
    1: "start",
    2: "save",
    3: "restore",
    4: "incoming migration",
    5: "outgoing migration",
    6: "snapshot",
    7: "snapshot revert",
    8: "dump",
    9: "backup",
    10: "snapshot delete",
}
BACKUP_JOB = _OPERATIONS[9]
_JOB_END_TIMEOUT = 30.0


class LibvirtError(WorkerError):
    """libvirt refused or failed a call; the message names the domain and libvirt's
    reason. Retryable: libvirtd restarting or a domain between states passes."""

    retryable = True

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code  # libvirt's virErrorNumber, 0 when not from libvirt


class LibvirtSetupError(LibvirtError):
    """The domain does not fit the config: no such libvirt domain, a configured disk it
    lacks, a disk that is not qcow2. Not retryable: fix the config or the domain."""

    retryable = False


class CheckpointInconsistentError(LibvirtError):
    """libvirt has the checkpoint but its bitmap is missing or broken (QEMU exited
    uncleanly): a full backup is needed. Not retryable as an incremental."""

    retryable = False


# virErrorNumber values this module tells apart (libvirt's virterror.h).
_ERR_NO_DOMAIN = 42
_ERR_CHECKPOINT_INCONSISTENT = 109
_ERR_NO_DOMAIN_CHECKPOINT = 110


def _libvirt() -> Any:
    try:
        import libvirt
    except ImportError as err:
        raise LibvirtError(
            "python3-libvirt is not installed: apt-get install python3-libvirt "
            "(libvirt domains need it)"
        ) from err
    # libvirt prints every error to stderr by default; ours carry the message instead.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


@dataclass(frozen=True)
class LibvirtDisk:
    """One disk of the domain XML: target name (``vda``), image path, format."""

    name: str
    path: Path
    format: str


class LibvirtDomain:
    """One domain on one libvirt connection (see :func:`open_domain`)."""

    def __init__(self, domain: str, conn: Any, dom: Any) -> None:
        self.domain = domain  # vmvault's name, for messages
        self._conn = conn
        self._dom = dom
        self._lv = _libvirt()

    def _call(self, what: str, func: Any, *args: Any) -> Any:
        try:
            return func(*args)
        except self._lv.libvirtError as err:
            code = err.get_error_code() or 0
            kind = (
                CheckpointInconsistentError
                if code == _ERR_CHECKPOINT_INCONSISTENT
                else LibvirtError
            )
            raise kind(
                f"libvirt domain {self.domain!r}: {what} failed: {err.get_error_message()}", code
            ) from err

    # -- state --------------------------------------------------------------------------------

    def is_active(self) -> bool:
        """True while its QEMU runs (paused included)."""
        return bool(self._call("isActive", self._dom.isActive))

    def xml(self, inactive: bool = False) -> str:
        flags = self._lv.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        return str(self._call("XMLDesc", self._dom.XMLDesc, flags))

    def disks(self, allow: Sequence[str] | None = None) -> list[LibvirtDisk]:
        """The writable file disks of the domain XML (or those ``allow`` names), in order."""
        found = parse_disks(self.xml())
        names = {d.name for d in found}
        missing = sorted(set(allow or []) - names)
        if missing:
            raise LibvirtSetupError(
                f"libvirt domain {self.domain!r} has no disk {', '.join(missing)} "
                f"(its disks: {', '.join(sorted(names)) or 'none'}): "
                f"fix domains.{self.domain}.disks"
            )
        chosen = [d for d in found if allow is None or d.name in allow]
        if not chosen:
            raise LibvirtSetupError(f"libvirt domain {self.domain!r} has no writable file disk")
        for disk in chosen:
            if disk.format != "qcow2":
                raise LibvirtSetupError(
                    f"libvirt domain {self.domain!r} disk {disk.name} is {disk.format}: libvirt "
                    "checkpoints need qcow2 images; convert it or leave it out of "
                    f"domains.{self.domain}.disks"
                )
        return chosen

    def disk_size(self, disk: str) -> int:
        """The disk's virtual size in bytes (``virDomainGetBlockInfo`` capacity)."""
        info = self._call(f"blockInfo({disk})", self._dom.blockInfo, disk)
        return int(info[0])

    def job(self) -> str | None:
        """What libvirt's running job on the domain does (``backup``, ``outgoing
        migration``…), None when there is none."""
        if not self.is_active():
            return None
        stats = self._call("jobStats", self._dom.jobStats)
        if stats.get("type", 0) == self._lv.VIR_DOMAIN_JOB_NONE:
            return None
        return _OPERATIONS.get(int(stats.get("operation", 0)), "unknown")

    def backup_socket(self) -> Path | None:
        """The unix socket of the running pull-mode backup job, None when there is none."""
        try:
            doc = ET.fromstring(self._dom.backupGetXMLDesc(0))
        except self._lv.libvirtError:
            return None  # no backup job
        server = doc.find("server")
        sock = server.get("socket") if server is not None else None
        return Path(sock) if sock else None

    def abort_job(self, timeout: float = _JOB_END_TIMEOUT) -> None:
        """End the running job; for a pull-mode backup this is the normal end (libvirt
        stops the NBD server and deletes the scratch files it created).

        virDomainAbortJob can return while libvirt still winds the job down (its block
        jobs end asynchronously): wait until it reports none, so that the next job on the
        domain does not find this one.
        """
        self._call("abortJob", self._dom.abortJob)
        deadline = time.monotonic() + timeout
        while self.job() is not None:
            if time.monotonic() > deadline:
                raise LibvirtError(
                    f"libvirt domain {self.domain!r}: its job did not end within {timeout:.0f}s "
                    "of virDomainAbortJob"
                )
            time.sleep(0.05)

    # -- checkpoints --------------------------------------------------------------------------

    def checkpoints(self) -> dict[str, set[str]]:
        """Every checkpoint libvirt knows for the domain → the disks it has a bitmap on."""
        out: dict[str, set[str]] = {}
        for point in self._call("listAllCheckpoints", self._dom.listAllCheckpoints):
            doc = ET.fromstring(self._call("checkpoint XML", point.getXMLDesc, 0))
            out[point.getName()] = {
                d.get("name", "")
                for d in doc.findall("disks/disk")
                if d.get("checkpoint") == "bitmap"
            }
        return out

    def delete_checkpoint(self, name: str) -> None:
        """Delete a checkpoint (libvirt merges its bitmap into its parent's). When its
        bitmap is already gone (QEMU exited uncleanly), only libvirt's metadata is left:
        that is deleted instead."""
        point = self._call(f"checkpoint {name}", self._dom.checkpointLookupByName, name)
        try:
            self._call(f"deleting checkpoint {name}", point.delete, 0)
        except LibvirtError as err:
            log.info("domain %s: %s; deleting its metadata only", self.domain, err)
            flag = self._lv.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY
            self._call(f"deleting checkpoint {name} metadata", point.delete, flag)

    def delete_checkpoint_metadata(self, name: str) -> None:
        """Forget a checkpoint whose bitmaps are gone (its images were replaced)."""
        point = self._call(f"checkpoint {name}", self._dom.checkpointLookupByName, name)
        flag = self._lv.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY
        self._call(f"deleting checkpoint {name} metadata", point.delete, flag)

    def redefine_checkpoint(self, name: str, disks: Sequence[str], created: int) -> None:
        """Give libvirt the metadata of checkpoint ``name`` whose bitmaps already exist in
        the images (a restore wrote them): ``VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE``;
        ``created`` is its creation time (Unix seconds), which a redefinition must carry."""
        domain_xml = self.xml(inactive=not self.is_active())
        doc = checkpoint_xml(name, disks, f"<creationTime>{created}</creationTime>{domain_xml}")
        flag = self._lv.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
        self._call(f"redefining checkpoint {name}", self._dom.checkpointCreateXML, doc, flag)

    # -- backup -------------------------------------------------------------------------------

    def begin_backup(
        self,
        disks: Sequence[LibvirtDisk],
        socket: Path,
        scratch: dict[str, Path],
        incremental: str | None,
        checkpoint: str,
    ) -> dict[str, str]:
        """``virDomainBackupBegin``: checkpoint ``checkpoint`` and a pull-mode backup of
        ``disks`` in one call, exported on ``socket``; returns disk → export bitmap name
        (incremental only). Raises :class:`CheckpointInconsistentError` when libvirt finds
        ``incremental``'s bitmap missing or broken."""
        backup = backup_xml(disks, socket, scratch, incremental)
        point = checkpoint_xml(checkpoint, [d.name for d in disks])
        self._call("backupBegin", self._dom.backupBegin, backup, point, 0)
        return export_bitmaps(self._call("backupGetXMLDesc", self._dom.backupGetXMLDesc, 0))

    def start(self) -> None:
        self._call("start", self._dom.create)


def parse_disks(xml: str) -> list[LibvirtDisk]:
    """The writable, unshared file disks of a domain XML (pure)."""
    out: list[LibvirtDisk] = []
    for disk in ET.fromstring(xml).findall("devices/disk"):
        if disk.get("device", "disk") != "disk" or disk.get("type") != "file":
            continue
        if disk.find("readonly") is not None or disk.find("shareable") is not None:
            continue
        target, source, driver = disk.find("target"), disk.find("source"), disk.find("driver")
        if target is None or source is None or not source.get("file"):
            continue
        fmt = driver.get("type", "raw") if driver is not None else "raw"
        out.append(LibvirtDisk(target.get("dev", ""), Path(source.get("file", "")), fmt))
    return out


def backup_xml(
    disks: Sequence[LibvirtDisk],
    socket: Path,
    scratch: dict[str, Path],
    incremental: str | None,
) -> str:
    """The ``<domainbackup mode='pull'>`` document (pure); disks not listed are not
    backed up (libvirt's default is every disk)."""
    inc = f"<incremental>{_text(incremental)}</incremental>" if incremental else ""
    parts = [
        f"<disk name={quoteattr(d.name)} backup='yes' type='file'>"
        f"<scratch file={quoteattr(str(scratch[d.name]))}/></disk>"
        for d in disks
    ]
    return (
        f"<domainbackup mode='pull'>{inc}"
        f"<server transport='unix' socket={quoteattr(str(socket))}/>"
        f"<disks>{''.join(parts)}</disks></domainbackup>"
    )


def checkpoint_xml(name: str, disks: Sequence[str], extra: str | None = None) -> str:
    """The ``<domaincheckpoint>`` document (pure); a redefinition's ``extra`` carries its
    creation time and the domain XML."""
    parts = "".join(f"<disk name={quoteattr(d)} checkpoint='bitmap'/>" for d in disks)
    return (
        f"<domaincheckpoint><name>{_text(name)}</name><disks>{parts}</disks>"
        f"{extra or ''}</domaincheckpoint>"
    )


def export_bitmaps(backup_doc: str) -> dict[str, str]:
    """Disk → the dirty bitmap libvirt exports with it (``exportbitmap``), from the
    running backup's XML (pure)."""
    return {
        d.get("name", ""): d.get("exportbitmap", "")
        for d in ET.fromstring(backup_doc).findall("disks/disk")
        if d.get("exportbitmap")
    }


def _text(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


@contextlib.contextmanager
def open_domain(domain: str, uri: str, name: str) -> Iterator[LibvirtDomain]:
    """A connection to ``uri`` and its domain ``name``; closed on exit."""
    lv = _libvirt()
    try:
        conn = lv.open(uri)
    except lv.libvirtError as err:
        raise LibvirtError(
            f"domain {domain!r}: cannot connect to libvirt at {uri}: {err.get_error_message()}"
            f" (is libvirtd running? check domains.{domain}.libvirt.uri)"
        ) from err
    try:
        try:
            dom = conn.lookupByName(name)
        except lv.libvirtError as err:
            if err.get_error_code() == _ERR_NO_DOMAIN:
                raise LibvirtSetupError(
                    f"domain {domain!r}: libvirt at {uri} has no domain {name!r}: "
                    f"check domains.{domain}.libvirt.name",
                    _ERR_NO_DOMAIN,
                ) from err
            raise LibvirtError(
                f"domain {domain!r}: looking up {name!r} at {uri} failed: {err.get_error_message()}"
            ) from err
        yield LibvirtDomain(domain, conn, dom)
    finally:
        with contextlib.suppress(lv.libvirtError):
            conn.close()
