"""Repository verification: structure (manifests, indexes, chunk presence) and, with
``read_data``, every referenced chunk downloaded, decrypted, decompressed, re-hashed and
measured (a chunk of the wrong length restores nowhere, whatever its digest).

Every problem names the domain, backup id, disk and byte offset it affects.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from vmvault.storage.errors import StorageError
from vmvault.storage.format import CHUNKS_PREFIX, IndexEntry, Manifest, chunk_key
from vmvault.storage.progress import Progress
from vmvault.storage.repository import Repository

# Per chunk, where it is used: (domain, backup_id, disk, offset, expected length).
Ref = tuple[str, str, str, int, int]


@dataclass(frozen=True)
class Problem:
    """One thing wrong, located as precisely as possible."""

    domain: str
    backup_id: str
    disk: str | None
    offset: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.domain} {self.backup_id}"
        if self.disk is not None:
            where += f" disk {self.disk}"
        if self.offset is not None:
            where += f" offset {self.offset}"
        return f"{where}: {self.message}"

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "backup_id": self.backup_id,
            "disk": self.disk,
            "offset": self.offset,
            "message": self.message,
        }


@dataclass
class VerifyReport:
    """Counts of what was checked and every problem found."""

    backups: int = 0
    disks: int = 0
    chunks_referenced: int = 0
    chunks_read: int = 0
    bytes_read: int = 0
    read_data: bool = False
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> VerifyReport:
        """The report ``to_json`` gave (a queued verify's result)."""
        fields = {k: v for k, v in doc.items() if k not in ("ok", "problems")}
        return cls(**fields, problems=[Problem(**p) for p in doc["problems"]])

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "backups": self.backups,
            "disks": self.disks,
            "chunks_referenced": self.chunks_referenced,
            "chunks_read": self.chunks_read,
            "bytes_read": self.bytes_read,
            "read_data": self.read_data,
            "problems": [p.to_json() for p in self.problems],
        }


def verify(
    repo: Repository,
    backup_id: str | None = None,
    read_data: bool = False,
    progress: Progress | None = None,
) -> VerifyReport:
    """Check one backup (``backup_id``) or the whole repository."""
    report = VerifyReport(read_data=read_data)
    keys = repo.manifest_keys()
    if backup_id is not None:
        keys = [k for k in keys if k[1] == backup_id]
        if not keys:
            repo.find_backup(backup_id)  # raises BackupNotFoundError with the usual text

    manifests: dict[str, Manifest] = {}
    for domain, bid, key in keys:
        try:
            manifests[bid] = repo._load_manifest_key(key)
        except StorageError as err:
            report.problems.append(Problem(domain, bid, None, None, f"manifest: {err}"))
    report.backups = len(keys)

    refs: dict[str, list[Ref]] = defaultdict(list)
    indexes: dict[tuple[str, str], list[IndexEntry]] = {}
    for m in manifests.values():
        for disk in m.disks:
            report.disks += 1
            try:
                entries = repo.load_index(m, disk.name)
            except StorageError as err:
                report.problems.append(Problem(m.domain, m.backup_id, disk.name, None, str(err)))
                continue
            indexes[(m.backup_id, disk.name)] = entries
            cs = m.chunk_size
            for i, e in enumerate(entries):
                if e.digest:
                    size = min(cs, disk.virtual_size - i * cs)
                    refs[e.digest].append((m.domain, m.backup_id, disk.name, i * cs, size))
    _check_parents(repo, manifests, indexes, report)
    report.chunks_referenced = len(refs)

    # Presence: one listing for the whole repository; HEADs for a single backup.
    digests = sorted(refs)
    if backup_id is None:
        present = {i.key.rsplit("/", 1)[-1] for i in repo.backend.list(CHUNKS_PREFIX)}
        missing = [d for d in digests if d not in present]
    else:
        exists = list(repo.pool.map(lambda d: repo.backend.exists(chunk_key(d)), digests))
        missing = [d for d, ok in zip(digests, exists, strict=True) if not ok]
    for d in missing:
        for domain, bid, disk_name, offset, _ in refs[d]:
            report.problems.append(Problem(domain, bid, disk_name, offset, f"chunk {d} is missing"))

    if read_data:
        gone = set(missing)
        todo = [d for d in digests if d not in gone]

        def check(digest: str) -> tuple[str, int, str | None]:
            try:
                return digest, len(repo.read_chunk(digest)), None
            except StorageError as err:
                return digest, 0, str(err)

        for n, (digest, size, error) in enumerate(repo.pool.map(check, todo), 1):
            report.chunks_read += 1
            report.bytes_read += size
            for domain, bid, disk_name, offset, expected in refs[digest]:
                if error is None and size != expected:
                    problem = f"chunk {digest} has {size} bytes, expected {expected}"
                    report.problems.append(Problem(domain, bid, disk_name, offset, problem))
                elif error is not None:
                    report.problems.append(Problem(domain, bid, disk_name, offset, error))
            if progress and (n % 16 == 0 or n == len(todo)):
                progress("read-data", n, len(todo))
    return report


def _check_parents(
    repo: Repository,
    manifests: dict[str, Manifest],
    indexes: dict[tuple[str, str], list[IndexEntry]],
    report: VerifyReport,
) -> None:
    """An incremental's chunks marked "kept from parent" must equal the parent's entries."""
    for m in manifests.values():
        if m.parent is None:
            continue
        parent = manifests.get(m.parent)
        if parent is None:
            try:
                parent = repo.load_manifest(m.domain, m.parent)
            except StorageError:
                continue  # the parent was pruned: nothing left to compare with
        for disk in m.disks:
            entries = indexes.get((m.backup_id, disk.name))
            if entries is None or not any(e.from_parent for e in entries):
                continue
            pentries = indexes.get((parent.backup_id, disk.name))
            if pentries is None:
                try:
                    pentries = repo.load_index(parent, disk.name)
                except StorageError:
                    continue  # reported when the parent itself is checked
            for i, e in enumerate(entries):
                if e.from_parent and (i >= len(pentries) or pentries[i].digest != e.digest):
                    report.problems.append(
                        Problem(
                            m.domain,
                            m.backup_id,
                            disk.name,
                            i * m.chunk_size,
                            f"chunk kept from parent {m.parent} differs from the parent's index",
                        )
                    )
