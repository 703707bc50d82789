"""``NbdDiskWriter`` against a real qemu-nbd: data, zero runs, flush, verification."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.common import require_binary, stop_process, wait_until
from vmvault.worker.nbd_write import NbdDiskWriter, NbdWriteError, VerifyError, sha256_hex

MiB = 1024 * 1024
CHUNK = 1 * MiB


@pytest.fixture
def nbd_target(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A 16.5 MiB raw file full of 0xAA served writable by qemu-nbd: (socket, image)."""
    qemu_nbd = require_binary("qemu-nbd")
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\xaa" * (16 * MiB + 512 * 1024))
    sockdir = Path(tempfile.mkdtemp(prefix="vmv"))
    sock = sockdir / "nbd.sock"
    proc = subprocess.Popen(
        [qemu_nbd, "-f", "raw", f"--socket={sock}", "--persistent", str(image)],
        start_new_session=True,
    )
    try:
        wait_until(sock.exists, 10, "qemu-nbd socket", proc)
        yield sock, image
    finally:
        stop_process(proc)
        subprocess.run(["rm", "-rf", str(sockdir)], check=False)


def _chunks(size: int) -> list[tuple[int, bytes | None]]:
    """Data, zero runs and an all-zero data chunk; the tail chunk is short."""
    out: list[tuple[int, bytes | None]] = []
    for index, offset in enumerate(range(0, size, CHUNK)):
        length = min(CHUNK, size - offset)
        if index in (2, 3, 4, 9, 16):
            out.append((offset, None))
        elif index == 7:
            out.append((offset, bytes(length)))
        else:
            out.append((offset, os.urandom(length)))
    return out


def _expected(chunks: list[tuple[int, bytes | None]]) -> bytes:
    return b"".join(bytes(CHUNK) if d is None else d for _, d in chunks)


def test_writes_data_and_zeroes_a_dirty_target(nbd_target: tuple[Path, Path]) -> None:
    sock, image = nbd_target
    with NbdDiskWriter(sock, "vda", max_in_flight=4, max_in_flight_bytes=3 * MiB) as writer:
        chunks = _chunks(writer.size)
        stats = writer.write_chunks(iter(chunks), CHUNK, target_is_zero=False)
        writer.flush()
        digests = [None if d is None or not any(d) else sha256_hex(d) for _, d in chunks]
        assert writer.verify(digests, CHUNK, sha256_hex) == writer.size
    # Chunks 2-4 are one zero run, 7 (all-zero data) and 9 and the short tail 16 are zeroed.
    assert stats.bytes_zeroed == 5 * CHUNK + 512 * 1024
    assert stats.bytes_written == writer.size - stats.bytes_zeroed
    assert image.read_bytes()[: len(_expected(chunks))] == _expected(chunks)[: writer.size]


def test_fresh_target_gets_no_zero_requests(nbd_target: tuple[Path, Path]) -> None:
    sock, image = nbd_target
    with NbdDiskWriter(sock, "vda") as writer:
        chunks = _chunks(writer.size)
        stats = writer.write_chunks(iter(chunks), CHUNK, target_is_zero=True)
        writer.flush()
    assert stats.bytes_zeroed == 0
    assert stats.bytes_skipped == 5 * CHUNK + 512 * 1024
    # The target was not zero, so the skipped chunks still hold the old 0xAA bytes.
    assert image.read_bytes()[2 * CHUNK : 2 * CHUNK + 4] == b"\xaa" * 4


def test_verify_names_disk_and_offset(nbd_target: tuple[Path, Path]) -> None:
    sock, _ = nbd_target
    with NbdDiskWriter(sock, "vdb") as writer:
        chunks = _chunks(writer.size)
        writer.write_chunks(iter(chunks), CHUNK, target_is_zero=False)
        writer.flush()
        digests = [None if d is None or not any(d) else sha256_hex(d) for _, d in chunks]
        digests[5] = sha256_hex(b"something else")
        with pytest.raises(VerifyError, match=r"disk vdb: verification failed at offset 5242880"):
            writer.verify(digests, CHUNK, sha256_hex)
        # A zero chunk that holds data is caught too.
        digests = [None] * len(digests)
        with pytest.raises(VerifyError, match=r"offset 0 .*should be all zeroes") as info:
            writer.verify(digests, CHUNK, sha256_hex)
        assert info.value.offset == 0


def test_chunk_past_the_end_is_refused(nbd_target: tuple[Path, Path]) -> None:
    sock, _ = nbd_target
    with NbdDiskWriter(sock, "vda") as writer, pytest.raises(NbdWriteError, match="does not fit"):
        writer.write_chunks(iter([(16 * MiB, os.urandom(CHUNK))]), CHUNK, target_is_zero=True)


def test_connect_to_missing_socket_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(NbdWriteError, match="disk vda: cannot connect to NBD server"):
        NbdDiskWriter(tmp_path / "nope.sock", "vda").connect(timeout=0.2)


def test_pipelined_windows_write_zero_runs_and_verify(nbd_target: tuple[Path, Path]) -> None:
    """Windows of 3 chunks: zero runs cross window boundaries, each window is flushed and read
    back while later ones are written; the target is dirty, so zero runs must really be sent."""
    sock, image = nbd_target
    seen: list[tuple[str, int]] = []
    with NbdDiskWriter(sock, "vda", max_in_flight=4) as writer:
        chunks = _chunks(writer.size)
        digests = [None if d is None or not any(d) else sha256_hex(d) for _, d in chunks]
        stats, verified = writer.write_and_verify(
            iter(chunks), CHUNK, digests, sha256_hex, target_is_zero=False, window=3 * CHUNK,
            progress=lambda phase, done, total: seen.append((phase, done)),
        )  # fmt: skip
        assert verified == writer.size
        assert stats.bytes_zeroed == 5 * CHUNK + 512 * 1024
        # Every byte was reported both written and verified. (Whether verification overlaps
        # the writes depends on when the server completes them: timing, not asserted here.)
        assert max(done for phase, done in seen if phase == "verify") == writer.size
        # A wrong digest in a middle window is reported with its offset.
        digests[10] = sha256_hex(b"not this")
        with pytest.raises(VerifyError, match=f"offset {10 * CHUNK} "):
            writer.write_and_verify(
                iter(chunks), CHUNK, digests, sha256_hex, target_is_zero=False, window=3 * CHUNK
            )
    assert image.read_bytes()[: 16 * CHUNK] == _expected(chunks)[: 16 * CHUNK]


def test_read_only_export_is_refused(tmp_path: Path) -> None:
    qemu_nbd = require_binary("qemu-nbd")
    image = tmp_path / "ro.raw"
    image.write_bytes(bytes(MiB))
    sockdir = Path(tempfile.mkdtemp(prefix="vmv"))
    sock = sockdir / "ro.sock"
    proc = subprocess.Popen(
        [qemu_nbd, "-f", "raw", "-r", f"--socket={sock}", str(image)], start_new_session=True
    )
    try:
        wait_until(sock.exists, 10, "qemu-nbd socket", proc)
        with pytest.raises(NbdWriteError, match=r"disk vdc: NBD export '' at .* is read-only"):
            NbdDiskWriter(sock, "vdc").connect()
    finally:
        stop_process(proc)
        subprocess.run(["rm", "-rf", str(sockdir)], check=False)


def test_chunk_going_back_is_refused_not_written_unverified(
    nbd_target: tuple[Path, Path],
) -> None:
    """A reader that yields an offset again, after its window may be verified already, must
    fail the restore: that write would land after the read-back checked the chunk."""
    sock, image = nbd_target
    with NbdDiskWriter(sock, "vda", max_in_flight=2) as writer:
        chunks = [
            (o, os.urandom(min(CHUNK, writer.size - o))) for o in range(0, writer.size, CHUNK)
        ]
        digests: list[str | None] = [sha256_hex(d) for _, d in chunks]
        bad: list[tuple[int, bytes | None]] = [*chunks, (0, b"\x5a" * CHUNK)]
        with pytest.raises(NbdWriteError, match="offset 0 comes after"):
            writer.write_and_verify(
                iter(bad), CHUNK, digests, sha256_hex, target_is_zero=False, window=CHUNK
            )
    assert image.read_bytes()[:CHUNK] == chunks[0][1]
