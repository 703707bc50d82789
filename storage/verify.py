"""Repository verification: structure (manifests, indexes, chunk and pack presence) and,
with ``read_data``, every referenced chunk downloaded, decrypted, decompressed, re-hashed
and measured, and every patched region rebuilt from its pieces and checked against its
digest: the bytes a restore would write, not only the pieces (sections 14 and 28).

Every problem names the domain, backup id, disk and byte offset it affects.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from vmvault.storage.disk_reader import DiskReader
from vmvault.storage.errors import StorageError
from vmvault.storage.format import CHUNKS_PREFIX, Manifest
from vmvault.storage.index_v2 import DiskIndex
from vmvault.storage.progress import Progress
from vmvault.storage.region import Kind, Region
from vmvault.storage.region_store import PACKS_PREFIX, chunk_name_key, pack_key
from vmvault.storage.repository import Repository
from vmvault.storage.verification import new_check, record_check

log = logging.getLogger(__name__)

# Where an object is used: (domain, backup_id, disk, offset).
Ref = tuple[str, str, str, int]


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
    packs_referenced: int = 0
    regions_rebuilt: int = 0
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
            "packs_referenced": self.packs_referenced,
            "regions_rebuilt": self.regions_rebuilt,
            "read_data": self.read_data,
            "problems": [p.to_json() for p in self.problems],
        }


@dataclass
class _Refs:
    """Every object the checked backups need, and where each is used."""

    # chunk key -> (hex name, region length it must hold, LEGACY?) and its users
    chunks: dict[str, tuple[str, int, bool]] = field(default_factory=dict)
    chunk_users: dict[str, list[Ref]] = field(default_factory=lambda: defaultdict(list))
    # pack key -> stored size the indexes give, and its users
    packs: dict[str, int] = field(default_factory=dict)
    pack_users: dict[str, list[Ref]] = field(default_factory=lambda: defaultdict(list))
    # patched regions to rebuild (kept ones repeat across backups: checked once)
    patched: dict[Region, list[Ref]] = field(default_factory=lambda: defaultdict(list))

    def add(self, m: Manifest, disk: str, index: DiskIndex, report: VerifyReport) -> None:
        for i, r in enumerate(index.regions):
            ref = (m.domain, m.backup_id, disk, i * index.region_size)
            if r.kind is Kind.ZERO:
                continue
            if r.kind is Kind.LEGACY:
                self._chunk(chunk_name_key(r.digest), r.digest.hex(), r.length, True, ref, report)
                continue
            if r.base_length:
                self._chunk(chunk_name_key(r.base), r.base.hex(), r.base_length, False, ref, report)
            if r.kind is Kind.PATCHED:
                self.patched[replace(r, from_parent=False)].append(ref)
            for f in r.fragments:
                key = pack_key(f.pack)
                size = index.pack_sizes[f.pack]
                if self.packs.setdefault(key, size) != size:
                    report.problems.append(
                        Problem(*ref, f"pack {f.pack.hex()}: indexes disagree on its size")
                    )
                self.pack_users[key].append(ref)

    def _chunk(
        self, key: str, name: str, length: int, legacy: bool, ref: Ref, report: VerifyReport
    ) -> None:
        if self.chunks.setdefault(key, (name, length, legacy)) != (name, length, legacy):
            report.problems.append(
                Problem(*ref, f"chunk {name} is used as regions of different sizes or formats")
            )
        self.chunk_users[key].append(ref)


def verify(
    repo: Repository,
    backup_id: str | None = None,
    read_data: bool = False,
    progress: Progress | None = None,
    only: Collection[str] | None = None,
    record: bool = True,
) -> VerifyReport:
    """Check one backup (``backup_id``), the backups in ``only``, or the whole repository.

    With ``record``, each checked backup whose manifest reads gets its verification record
    (section 30) saying ok or FAILED with its first problems.
    """
    report = VerifyReport(read_data=read_data)
    keys = repo.manifest_keys()
    if backup_id is not None:
        keys = [k for k in keys if k[1] == backup_id]
        if not keys:
            repo.find_backup(backup_id)  # raises BackupNotFoundError with the usual text
    if only is not None:
        wanted = set(only)
        keys = [k for k in keys if k[1] in wanted]

    manifests: dict[str, Manifest] = {}
    for domain, bid, key in keys:
        try:
            manifests[bid] = repo._load_manifest_key(key)
        except StorageError as err:
            report.problems.append(Problem(domain, bid, None, None, f"manifest: {err}"))
    report.backups = len(keys)

    refs = _Refs()
    indexes: dict[tuple[str, str], DiskIndex] = {}
    for m in manifests.values():
        for disk in m.disks:
            report.disks += 1
            try:
                index = DiskReader(repo, m, disk.name).index
            except StorageError as err:
                report.problems.append(Problem(m.domain, m.backup_id, disk.name, None, str(err)))
                continue
            indexes[(m.backup_id, disk.name)] = index
            refs.add(m, disk.name, index, report)
    _check_parents(repo, manifests, indexes, report)
    report.chunks_referenced = len(refs.chunks)
    report.packs_referenced = len(refs.packs)

    # Presence: one listing of chunks for the whole repository, HEADs for one backup;
    # packs are listed (they are few, and their sizes must match the indexes).
    chunk_keys = sorted(refs.chunks)
    if backup_id is None:
        present = {i.key for i in repo.backend.list(CHUNKS_PREFIX)}
        missing = [k for k in chunk_keys if k not in present]
    else:
        exists = list(repo.pool.map(repo.backend.exists, chunk_keys))
        missing = [k for k, ok in zip(chunk_keys, exists, strict=True) if not ok]
    for k in missing:
        for ref in refs.chunk_users[k]:
            report.problems.append(Problem(*ref, f"chunk {refs.chunks[k][0]} is missing"))
    bad_packs: set[str] = set()
    if refs.packs:
        sizes = {i.key: i.size for i in repo.backend.list(PACKS_PREFIX)}
        for key, size in sorted(refs.packs.items()):
            got = sizes.get(key)
            if got == size:
                continue
            bad_packs.add(key)
            what = "is missing" if got is None else f"has {got} bytes, the index says {size}"
            for ref in refs.pack_users[key]:
                report.problems.append(Problem(*ref, f"pack {key.rsplit('/', 1)[-1]} {what}"))

    if read_data:
        _read_data(repo, refs, set(missing), bad_packs, report, progress)
    if record:
        _record(repo, manifests.values(), report)
    return report


def problem_text(p: Problem) -> str:
    """A problem as a record keeps it: what, then where in the backup."""
    where = f" at {p.disk}" if p.disk is not None else ""
    if p.offset is not None:
        where += f" offset {p.offset}"
    return p.message + where


def _record(repo: Repository, manifests: Iterable[Manifest], report: VerifyReport) -> None:
    """One verification record per checked backup (written after its manifest exists)."""
    by_backup: dict[str, list[str]] = defaultdict(list)
    for p in report.problems:
        by_backup[p.backup_id].append(problem_text(p))
    kind = "data" if report.read_data else "structure"
    now = datetime.now(UTC)

    def write(m: Manifest) -> str | None:
        try:
            record_check(repo, m.domain, m.backup_id, new_check(kind, by_backup[m.backup_id], now))
        except StorageError as err:
            return str(err)
        return None

    # A repository this host may only read (read-only S3 credentials) can still be
    # verified: the outcome is reported, only not recorded.
    errors = [e for e in repo.pool.map(write, manifests) if e is not None]
    if errors:
        log.warning(
            "verify: could not record %d verification(s) in %s (is the repository read-only?): %s",
            len(errors),
            repo.url,
            errors[0],
        )


def _read_data(
    repo: Repository,
    refs: _Refs,
    missing: set[str],
    bad_packs: set[str],
    report: VerifyReport,
    progress: Progress | None,
) -> None:
    """Fetch every chunk whole and check it; then rebuild every patched region."""
    todo = [k for k in sorted(refs.chunks) if k not in missing]

    def check(key: str) -> tuple[str, int, str | None]:
        name, length, legacy = refs.chunks[key]
        try:
            if legacy:
                data = repo.read_chunk(name)
                if len(data) != length:
                    return key, len(data), f"chunk {name} has {len(data)} bytes, expected {length}"
                return key, len(data), None
            return key, repo.regions.check_whole_chunk(bytes.fromhex(name), length)[2], None
        except StorageError as err:
            return key, 0, str(err)

    steps = len(todo) + len(refs.patched)
    done = 0
    damaged: set[str] = set()
    for key, size, error in repo.pool.map(check, todo):
        report.chunks_read += 1
        report.bytes_read += size
        if error is not None:
            damaged.add(key)
            report.problems.extend(Problem(*ref, error) for ref in refs.chunk_users[key])
        done += 1
        if progress and (done % 16 == 0 or done == steps):
            progress("read-data", done, steps)

    # A patched region whose pieces are already known bad was reported through them.
    def rebuild(region: Region) -> str | None:
        try:
            repo.regions.read_region(region, check=True)
        except StorageError as err:
            return str(err)
        return None

    def usable(r: Region) -> bool:
        pieces = {pack_key(f.pack) for f in r.fragments}
        if r.base_length:
            pieces.add(chunk_name_key(r.base))
        return not pieces & (missing | damaged | bad_packs)

    regions = [r for r in refs.patched if usable(r)]
    for region, error in zip(regions, repo.pool.map(rebuild, regions), strict=True):
        report.regions_rebuilt += 1
        if error is not None:
            report.problems.extend(
                Problem(*ref, f"region rebuilt from its pieces: {error}")
                for ref in refs.patched[region]
            )
        done += 1
        if progress and (done % 16 == 0 or done == steps):
            progress("read-data", done, steps)


def _check_parents(
    repo: Repository,
    manifests: dict[str, Manifest],
    indexes: dict[tuple[str, str], DiskIndex],
    report: VerifyReport,
) -> None:
    """An incremental's regions marked "kept from parent" must equal the parent's."""
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
            index = indexes.get((m.backup_id, disk.name))
            if index is None or not any(r.from_parent for r in index.regions):
                continue
            pindex = indexes.get((parent.backup_id, disk.name))
            if pindex is None:
                try:
                    pindex = DiskReader(repo, parent, disk.name).index
                except StorageError:
                    continue  # reported when the parent itself is checked
            for i, r in enumerate(index.regions):
                if not r.from_parent:
                    continue
                p = pindex.regions[i] if i < len(pindex.regions) else None
                if p is None or replace(p, from_parent=True) != r:
                    report.problems.append(
                        Problem(
                            m.domain,
                            m.backup_id,
                            disk.name,
                            i * m.chunk_size,
                            f"region kept from parent {m.parent} differs from the parent's index",
                        )
                    )
