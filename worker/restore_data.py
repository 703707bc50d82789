"""The restore data path of one disk: repository reader → NBD writer → read-back check.

Chunks are fetched with a bounded prefetch, written over NBD (worker/nbd_write.py) and
read back and compared with the backup's index (worker/nbd_verify.py). A mismatch is
blamed precisely: the repository's copy, or the write.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmvault.storage.disk_reader import DiskReader
from vmvault.storage.progress import Progress
from vmvault.storage.repository import Manifest, Repository
from vmvault.worker.errors import RestoreError
from vmvault.worker.nbd_write import NbdDiskWriter, VerifyError

# Bounded parallel prefetch from the repository: enough chunks in flight to hide S3
# latency, few enough that memory stays at a few dozen chunks per disk.
PREFETCH = 16


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

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> RestoredDisk:
        return cls(**{**doc, "path": Path(doc["path"])})


class RestoreReadError(RestoreError):
    """The repository could not deliver a chunk (store unreachable). Retryable later."""

    retryable = True


class DiskProgress:
    """Maps each disk's write and verify progress onto one job-wide byte counter."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self._progress = progress
        self._total = max(1, 2 * total)  # every byte is written once and read back once
        self._base = 0

    def disk(self, name: str, size: int) -> Progress:
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
    chunks: Iterator[tuple[int, bytes | None]], reader: DiskReader, disk: Any
) -> Iterator[tuple[int, bytes | None]]:
    """The reader's regions; a failure below the storage layer still names disk and offset.

    ``StorageError`` already says where (storage/disk_reader.py); a boto3 or OS error that
    the backend does not map to it is turned into ``RestoreReadError`` here rather than
    escaping as a traceback. The regions come unchecked (``check=False``): a region of the
    wrong length is blamed on the repository here, before it is written (it would overlap
    its neighbour); wrong content is caught by the read-back.
    """
    from botocore.exceptions import BotoCoreError

    rs = reader.region_size
    offset = 0
    while True:
        try:
            item = next(chunks)
        except StopIteration:
            return
        except (BotoCoreError, OSError) as err:
            raise RestoreReadError(
                f"{reader.where(offset // rs)}: cannot read from the repository: {err}"
            ) from err
        offset, data = item
        if data is not None and len(data) != min(rs, disk.virtual_size - offset):
            reader.blame(offset // rs)
            raise RestoreReadError(
                f"{reader.where(offset // rs)}: the repository gave a region of {len(data)} bytes"
            )
        offset += rs
        yield item


def restore_disk(
    repo: Repository,
    manifest: Manifest,
    disk: Any,
    socket: Path,
    export: str,
    progress: DiskProgress,
) -> RestoredDisk:
    """Write one disk through an NBD export, flush, read back and verify every chunk."""
    started = time.monotonic()
    reader = repo.disk_reader(manifest, disk.name)
    with NbdDiskWriter(socket, disk.name, export) as writer:
        if writer.size != disk.virtual_size:
            raise RestoreError(
                f"disk {disk.name}: the NBD target is {writer.size} bytes but backup"
                f" {manifest.backup_id} recorded {disk.virtual_size}"
            )
        # Written, flushed and read back in windows, so verification overlaps the writes.
        # The reader does not re-hash regions: the read-back compares every region on the
        # disk with the index, which proves the repository's copy right as well (one
        # BLAKE3 pass per byte instead of two; a failure is then blamed precisely).
        chunks = reader.regions(prefetch=PREFETCH, check=False)
        try:
            stats, _ = writer.write_and_verify(
                _reading(chunks, reader, disk),
                manifest.chunk_size,
                reader.expected,
                reader.digest,
                target_is_zero=True,
                progress=progress.disk(disk.name, disk.virtual_size),
            )
        except VerifyError as err:
            reader.blame(err.offset // manifest.chunk_size)
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
