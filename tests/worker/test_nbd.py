"""The libnbd reader against real qemu-nbd: extents over > 4 GiB, split and parallel reads."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.common import require_binary, stop_process, wait_until
from tests.fixtures.qemu import GiB, KiB, MiB
from worker.nbd import BASE_ALLOCATION, STATE_ZERO, NbdReader, chunks_touched
from worker.qmp import socket_is_listening

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
        [require_binary("qemu-nbd"), "-r", "-t", "-f", "qcow2", "-k", str(sock), str(image)],
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
