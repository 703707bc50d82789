"""The libnbd reader against real qemu-nbd: extents over > 4 GiB, split and parallel reads."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.common import require_binary, stop_process, wait_until
from tests.fixtures.qemu import GiB, KiB, MiB
from vmvault.worker.nbd import BASE_ALLOCATION, STATE_ZERO, NbdError
from vmvault.worker.nbd_read import NbdReader, chunks_touched
from vmvault.worker.qmp import socket_is_listening

SIZE = 5 * GiB  # more than one block_status request (2 GiB each) and past 32-bit lengths


@pytest.fixture
def nbd_socket(tmp_path: Path) -> Iterator[Path]:
    """A sparse 5 GiB qcow2 with data at 0, 4.5 GiB and 40 MiB..80 MiB, served read-only."""
    image = tmp_path / "disk.qcow2"
    qemu_img, qemu_io = require_binary("qemu-img"), require_binary("qemu-io")
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(image), str(SIZE)], check=True)
    for pattern, offset, length in ((0x11, 0, 64 * KiB), (0x22, 4608 * MiB, 1 * MiB),
                                    (0x33, 40 * MiB, 40 * MiB)):  # fmt: skip
        subprocess.run(
            [qemu_io, "-f", "qcow2", "-c", f"write -P {pattern:#x} {offset} {length}", str(image)],
            check=True,
            capture_output=True,
        )
    sock = Path(tempfile.mkdtemp(prefix="vmvn")) / "nbd.sock"
    proc = subprocess.Popen(
        # -e 4: up to 4 clients at once (parallel reads); qemu-nbd's default is 1.
        [
            require_binary("qemu-nbd"),
            "-r",
            "-t",
            "-e",
            "4",
            "-f",
            "qcow2",
            "-k",
            str(sock),
            str(image),
        ],
        start_new_session=True,
    )
    try:
        wait_until(lambda: socket_is_listening(sock), 10, "qemu-nbd", proc)
        yield sock
    finally:
        stop_process(proc)
        sock.unlink(missing_ok=True)
        sock.parent.rmdir()


def test_extents_cover_the_whole_disk_and_find_the_data(nbd_socket: Path) -> None:
    with NbdReader(nbd_socket, "", [BASE_ALLOCATION]) as reader:
        assert reader.size == SIZE
        extents = reader.extents()[BASE_ALLOCATION]
    pos = 0
    for ext in extents:
        assert ext.offset == pos and ext.length > 0
        pos = ext.end
    assert pos == SIZE
    chunk = 4 * MiB
    data = chunks_touched(extents, chunk, SIZE // chunk, STATE_ZERO, want=False)
    expected = {0, *range(10, 20), 4608 * MiB // chunk}
    assert {i for i, hit in enumerate(data) if hit} == expected


def test_reads_split_at_the_server_limit_and_keep_order(nbd_socket: Path) -> None:
    with NbdReader(nbd_socket, "") as reader:
        reader.max_request = 1 * MiB  # force splitting: one range = several NBD requests
        ranges = [(4608 * MiB, 1 * MiB), (36 * MiB, 8 * MiB), (0, 128 * KiB)]
        got = list(reader.read_ranges(ranges, depth=2))
    assert [offset for offset, _ in got] == [4608 * MiB, 36 * MiB, 0]
    assert got[0][1] == b"\x22" * MiB
    assert got[1][1] == b"\0" * (4 * MiB) + b"\x33" * (4 * MiB)
    assert got[2][1] == b"\x11" * (64 * KiB) + b"\0" * (64 * KiB)


def test_parallel_reads_cover_every_range_once_over_several_connections(
    nbd_socket: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        "vmvault.worker.nbd_read.READ_PIECE", 256 * KiB
    )  # 4 MiB ranges: 16 pieces each
    ranges = [(offset, 4 * MiB) for offset in range(32 * MiB, 88 * MiB, 4 * MiB)]
    ranges.append((4608 * MiB, 1 * MiB))
    with NbdReader(nbd_socket, "") as reader:
        got = dict(reader.read_parallel(ranges, connections=3, ahead=1))
        assert sorted(got) == sorted(offset for offset, _ in ranges)
        # Data at 40..80 MiB: the ranges around it are half zero, half pattern.
        assert got[36 * MiB] == b"\0" * (4 * MiB)
        assert got[40 * MiB] == b"\x33" * (4 * MiB)
        assert got[80 * MiB] == b"\0" * (4 * MiB)
        assert got[4608 * MiB] == b"\x22" * MiB
        # The first connection is still usable afterwards (extra ones are closed).
        _, first = next(iter(reader.read_ranges([(0, 64 * KiB)])))
        assert first == b"\x11" * (64 * KiB)


def test_parallel_read_failure_raises_nbd_error(nbd_socket: Path) -> None:
    with NbdReader(nbd_socket, "") as reader:
        beyond = [(0, 1 * MiB), (SIZE, 1 * MiB)]  # past the end: the server refuses
        with pytest.raises(NbdError, match="read failed"):
            list(reader.read_parallel(beyond, connections=2))
