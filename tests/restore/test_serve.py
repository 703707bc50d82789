"""``vmvault serve`` end to end: real nbdkit, real nbdcopy/nbdinfo/libnbd, file:// and s3://.

A chain of a full and five incrementals is made by the format 2 driver (the writer the
worker uses, fed from a bytes model), so the 5th incremental has PATCHED regions (base
chunk + fragments in packs) as well as CHUNK and ZERO ones. Each export must equal what
the repository itself restores (``repo.read_disk``), holes must show in the allocation
map, damage must fail the read with EIO, and stopping must leave nothing behind.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import nbd
import pytest
import yaml

from tests.fixtures.s3 import S3Bucket
from tests.restore.conftest import make_image, short_tmp, write_backup
from tests.storage.format2_driver import Disk, back_up, restore
from tests.storage.helpers import image, read_back, write_full
from vmvault.storage.disk_reader import DiskReader
from vmvault.storage.errors import RepositoryLockedError
from vmvault.storage.format import Manifest
from vmvault.storage.gc import collect_garbage
from vmvault.storage.locks import list_locks
from vmvault.storage.region import Kind
from vmvault.storage.region_store import chunk_name_key, pack_key
from vmvault.storage.repository import Repository, init_repository, open_repository
from vmvault.storage.upgrade import upgrade_repository
from vmvault.worker.nbd import release

KiB, MiB = 1024, 1024 * 1024
REGION = 1 * MiB  # 16 sub-blocks: room for patched regions with several fragments
SIZE = 6 * MiB + 100 * KiB  # a short last region with a short last sub-block
DOMAIN = "vm"  # what format2_driver.back_up names the domain


@dataclass
class Chain:
    repo: Repository
    config: Path
    root: Path | None  # file:// only: the repository's directory
    backups: list[Manifest]  # full, inc1 .. inc5

    def expected(self, manifest: Manifest) -> bytes:
        return restore(self.repo, manifest)


def _make_chain(repo: Repository, tmp_path: Path, repository: dict[str, Any]) -> Chain:
    rng = random.Random(13)
    data = bytearray(rng.randbytes(SIZE))
    data[2 * MiB : 4 * MiB] = bytes(2 * MiB)  # two ZERO regions
    data[5 * MiB : 5 * MiB + 256 * KiB] = bytes(256 * KiB)  # zero sub-blocks in a region
    disk = Disk(data)
    backups = [back_up(repo, disk, None, rng, domain=DOMAIN)]
    for _ in range(5):
        # Small scattered writes (PATCHED regions) and a zeroed range, away from the
        # two ZERO regions [2 MiB, 4 MiB).
        for _ in range(6):
            at = rng.choice(
                [rng.randrange(2 * MiB - 8 * KiB), rng.randrange(4 * MiB, SIZE - 8 * KiB)]
            )
            disk.write(at, rng.randbytes(rng.randrange(1, 8 * KiB)))
        disk.zero(rng.randrange(4 * MiB, SIZE - 128 * KiB, 64 * KiB), 128 * KiB)
        backups.append(back_up(repo, disk, backups[-1], rng, domain=DOMAIN))
    return _make_config(repo, tmp_path, repository, backups)


def _make_config(
    repo: Repository, tmp_path: Path, repository: dict[str, Any], backups: list[Manifest]
) -> Chain:
    config = tmp_path / "vmvault.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "repository": repository,
                "state_dir": str(tmp_path / "state"),
                "domains": {DOMAIN: {"host": "hv1", "qmp": str(tmp_path / "vm.qmp")}},
            }
        )
    )
    root = tmp_path / "repo" if repository["url"].startswith("file:") else None
    return Chain(repo, config, root, backups)


@pytest.fixture
def file_chain(tmp_path: Path) -> Chain:
    url = f"file://{tmp_path}/repo"
    return _make_chain(init_repository(url, chunk_size=REGION), tmp_path, {"url": url})


@pytest.fixture(params=["file", "s3"])
def chain(request: pytest.FixtureRequest, tmp_path: Path) -> Chain:
    if request.param == "file":
        chain: Chain = request.getfixturevalue("file_chain")
        return chain
    s3: S3Bucket = request.getfixturevalue("s3_server")
    url = s3.repo_url("repo")
    repo = init_repository(url, endpoint_url=s3.endpoint_url, chunk_size=REGION)
    return _make_chain(repo, tmp_path, {"url": url, "endpoint_url": s3.endpoint_url})


class Served:
    """A running ``vmvault serve --json``: its document, and how to stop it."""

    def __init__(self, proc: subprocess.Popen[str], doc: dict[str, Any], log: Path) -> None:
        self.proc = proc
        self.doc = doc
        self.log = log

    def uri(self, disk: str = "vda") -> str:
        return str(next(e["uri"] for e in self.doc["exports"] if e["disk"] == disk))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


def _cli(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "vmvault", "--config", str(config), *args]


def _read_document(out: IO[str]) -> dict[str, Any]:
    """The indented JSON document on stdout: up to its closing brace."""
    lines = []
    while line := out.readline():
        lines.append(line)
        if line.rstrip() == "}":
            break
    return dict(json.loads("".join(lines)))


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    """``serve(chain, *flags)`` starts ``vmvault serve DOMAIN --socket ... --json``."""
    started: list[Served] = []

    def start(chain: Chain, *flags: str) -> Served:
        sock = short_tmp() / "nbd.sock"
        log = tmp_path / f"serve{len(started)}.err"
        with log.open("w") as err:
            proc = subprocess.Popen(
                _cli(chain.config, "serve", DOMAIN, "--socket", str(sock), "--json", *flags),
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        assert proc.stdout is not None
        try:
            doc = _read_document(proc.stdout)
        except json.JSONDecodeError:
            proc.kill()
            proc.wait()
            raise AssertionError(f"serve did not start: {log.read_text()}") from None
        served = Served(proc, doc, log)
        started.append(served)
        return served

    yield start
    for served in started:
        if served.proc.poll() is None:
            served.proc.kill()
            served.proc.wait()


def _nbdcopy(uri: str, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nbdcopy", uri, str(out)], capture_output=True, text=True, timeout=120, check=False
    )


def _copy(uri: str, out: Path) -> bytes:
    result = _nbdcopy(uri, out)
    assert result.returncode == 0, result.stderr
    return out.read_bytes()


def test_export_equals_the_restore_of_a_full_and_of_the_5th_incremental(
    chain: Chain, serve: Any, tmp_path: Path
) -> None:
    full, inc5 = chain.backups[0], chain.backups[5]
    kinds = {r.kind for r in DiskReader(chain.repo, inc5, "vda").index.regions}
    assert {Kind.ZERO, Kind.CHUNK, Kind.PATCHED} <= kinds  # every way of storing a region
    for manifest in (full, inc5):
        served = serve(chain, "--backup", manifest.backup_id)
        assert served.doc["backup_id"] == manifest.backup_id
        [export] = served.doc["exports"]
        assert export["disk"] == "vda" and export["virtual_size"] == SIZE
        got = _copy(served.uri(), tmp_path / f"{manifest.backup_id}.raw")
        assert got == chain.expected(manifest)
        assert served.stop() == 0
    # The newest backup by default: the 5th incremental.
    served = serve(chain)
    assert served.doc["backup_id"] == inc5.backup_id
    assert served.stop() == 0


def test_map_shows_holes_where_the_backup_has_zeros(
    file_chain: Chain, serve: Any, tmp_path: Path
) -> None:
    inc5 = file_chain.backups[5]
    served = serve(file_chain, "--backup", inc5.backup_id)
    out = subprocess.run(
        ["nbdinfo", "--map", "--json", served.uri()],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    extents = json.loads(out)
    assert sum(e["length"] for e in extents) == SIZE
    holes = [(e["offset"], e["length"]) for e in extents if e["type"] & 1]
    expected = file_chain.expected(inc5)
    # Every hole reads as zeros (a wrong hole would lose data in a sparse copy) ...
    for offset, length in holes:
        assert expected[offset : offset + length] == bytes(length)
    # ... and every ZERO region of the index is a hole.
    index = DiskReader(file_chain.repo, inc5, "vda").index
    for i, r in enumerate(index.regions):
        if r.kind is Kind.ZERO:
            start = i * REGION
            assert any(o <= start and start + r.length <= o + n for o, n in holes), start
    info = json.loads(
        subprocess.run(
            ["nbdinfo", "--json", served.uri()], capture_output=True, text=True, check=True
        ).stdout
    )
    [export] = info["exports"]
    assert export["is_read_only"] and export["can_multi_conn"]


def _damage(path: Path, at: int) -> None:
    body = bytearray(path.read_bytes())
    body[at] ^= 0x40
    path.write_bytes(bytes(body))


def _pread_error(uri: str, offset: int, count: int) -> str | None:
    """The errno name of a failed read (None: it read), on a connection of its own."""
    h = nbd.NBD()
    try:
        h.connect_uri(uri)
        h.pread(count, offset)
        h.shutdown()
        return None
    except nbd.Error as err:
        return str(err.errno)
    finally:
        release(h)


def test_damaged_chunk_or_fragment_fails_the_read_with_eio(
    file_chain: Chain, serve: Any, tmp_path: Path
) -> None:
    assert file_chain.root is not None
    full, inc5 = file_chain.backups[0], file_chain.backups[5]
    want = [file_chain.expected(full), file_chain.expected(inc5)]
    regions = DiskReader(file_chain.repo, inc5, "vda").index.regions
    # A fragment of a PATCHED region of the 5th incremental, and a chunk only the full
    # backup's region 0 uses.
    p = next(i for i, r in enumerate(regions) if r.kind is Kind.PATCHED)
    frag = regions[p].fragments[-1]
    _damage(file_chain.root / pack_key(frag.pack), frag.offset + frag.stored_length // 2)
    full_regions = DiskReader(file_chain.repo, full, "vda").index.regions
    c = next(
        i
        for i, r in enumerate(full_regions)
        if r.kind is Kind.CHUNK and all(x.base != r.base for x in regions)
    )
    chunk = file_chain.root / chunk_name_key(full_regions[c].base)
    _damage(chunk, chunk.stat().st_size // 2)
    for manifest, bad, expected in ((inc5, p, want[1]), (full, c, want[0])):
        served = serve(file_chain, "--backup", manifest.backup_id)
        err = _pread_error(served.uri(), bad * REGION + 4 * KiB, 4 * KiB)
        assert err == "EIO"
        # The same region again: a failed fetch is not cached as good bytes.
        err = _pread_error(served.uri(), bad * REGION, 512)
        assert err == "EIO"
        good = 0 if bad != 0 else 1
        assert _pread_error(served.uri(), good * REGION, 4 * KiB) is None
        out = tmp_path / f"copy-{manifest.backup_id}.raw"
        result = _nbdcopy(served.uri(), out)
        assert result.returncode != 0
        assert served.stop() == 0
        # The damage is named on serve's stderr (nbdkit's, passed through).
        assert (
            f"backup {manifest.backup_id} disk vda offset {bad * REGION}" in served.log.read_text()
        )
        if out.exists():
            # What nbdcopy wrote before failing: the backup's bytes or nothing (zeros).
            got = out.read_bytes()
            lo, hi = bad * REGION, min((bad + 1) * REGION, len(got))
            assert got[lo:hi] in (expected[lo:hi], bytes(max(0, hi - lo)))


def test_parallel_connections_read_the_same_bytes(file_chain: Chain, serve: Any) -> None:
    inc5 = file_chain.backups[5]
    expected = file_chain.expected(inc5)
    served = serve(file_chain, "--backup", inc5.backup_id, "--cache-mib", "2")
    errors: list[BaseException] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        h = nbd.NBD()
        try:
            h.connect_uri(served.uri())
            for _ in range(150):
                count = rng.randrange(1, 300 * KiB)
                offset = rng.randrange(0, SIZE - count)
                assert h.pread(count, offset) == expected[offset : offset + count]
            h.shutdown()
        except BaseException as err:
            errors.append(err)
        finally:
            release(h)

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors


def test_sigterm_stops_nbdkit_and_leaves_no_socket_and_no_lease(
    file_chain: Chain, serve: Any
) -> None:
    served = serve(file_chain)
    sock = Path(served.doc["socket"])
    pid = served.doc["nbdkit_pid"]
    assert sock.is_socket() and (sock.stat().st_mode & 0o777) == 0o600
    [lock] = list_locks(file_chain.repo.backend)
    assert lock.kind == "shared" and lock.purpose.startswith("serve vm/")
    # A client that stays connected does not keep the server from stopping.
    client = nbd.NBD()
    client.connect_uri(served.uri())
    client.pread(4 * KiB, 0)
    started = time.monotonic()
    assert served.stop() == 0
    assert time.monotonic() - started < 10
    assert "stopped" in served.log.read_text()
    assert not sock.exists()
    assert list_locks(file_chain.repo.backend) == []
    assert not Path(f"/proc/{pid}").exists()
    with pytest.raises(nbd.Error):
        client.pread(4 * KiB, 0)
    release(client)


def test_gc_while_serving_is_refused_and_the_export_keeps_reading(
    file_chain: Chain, serve: Any, tmp_path: Path
) -> None:
    full = file_chain.backups[0]
    expected = file_chain.expected(full)
    served = serve(file_chain, "--backup", full.backup_id)
    # Every backup pruned: only the lease keeps GC from the chunks the export reads.
    for m in file_chain.backups:
        file_chain.repo.delete_backup(m)
    with pytest.raises(RepositoryLockedError, match=r"serve vm/"):
        collect_garbage(file_chain.repo, grace=0)
    assert _copy(served.uri(), tmp_path / "full.raw") == expected
    assert served.stop() == 0
    # Once stopped, GC runs and takes what nothing references any more.
    collect_garbage(file_chain.repo, grace=0)
    assert file_chain.root is not None
    assert not list((file_chain.root / "chunks").rglob("*"))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--backup", "20200101T000000Z-nope"], "no backup '20200101T000000Z-nope'"),
        (["--disk", "sdz"], "has no disk 'sdz'"),
        (["--at", "2001-01-01T00:00:00Z"], "no backup at or before 2001-01-01"),
    ],
)
def test_unknown_backup_or_disk_is_a_one_line_error(
    file_chain: Chain, flags: list[str], message: str
) -> None:
    sock = short_tmp() / "nbd.sock"
    result = subprocess.run(
        _cli(file_chain.config, "serve", DOMAIN, "--socket", str(sock), *flags),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not sock.exists() and list_locks(file_chain.repo.backend) == []


def test_usage_errors(file_chain: Chain, tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            _cli(file_chain.config, "serve", *args),
            capture_output=True,
            text=True,
            timeout=60,
        )

    missing = run(DOMAIN)
    assert missing.returncode == 2 and "--socket PATH or --listen HOST:PORT" in missing.stderr
    unknown = run("nosuchvm", "--socket", str(tmp_path / "s"))
    assert unknown.returncode == 2 and "nosuchvm" in unknown.stderr
    taken = tmp_path / "taken.sock"
    taken.write_text("")
    busy = run(DOMAIN, "--socket", str(taken))
    assert busy.returncode == 1 and "already exists" in busy.stderr
    bad = run(DOMAIN, "--listen", "localhost")
    assert bad.returncode == 1 and "HOST:PORT" in bad.stderr
    assert list_locks(file_chain.repo.backend) == []
    assert os.path.exists(taken)


def test_every_disk_is_an_export_and_tcp_works(
    tmp_path: Path, file_repo: Repository, fleet_config: Any
) -> None:
    vda = make_image(tmp_path / "vda.raw", 3 * MiB, 1, [(MiB, MiB)])
    vdb = make_image(tmp_path / "vdb.raw", 2 * MiB + 4 * KiB, 2, [])
    manifest = write_backup(file_repo, "web1", {"vda": vda, "vdb": vdb})
    config = tmp_path / "vmvault.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "repository": {"url": file_repo.url},
                "state_dir": str(tmp_path / "state"),
                "domains": {"web1": {"host": "hv1", "qmp": str(tmp_path / "web1.qmp")}},
            }
        )
    )
    with socket.socket() as probe:  # a free port (a race with others is unlikely here)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        _cli(config, "serve", "web1", "--listen", f"127.0.0.1:{port}"),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert f"serving backup {manifest.backup_id} of web1" in proc.stdout.readline()
        uris = [proc.stdout.readline().strip() for _ in range(2)]
        assert uris == [f"nbd://127.0.0.1:{port}/vda", f"nbd://127.0.0.1:{port}/vdb"]
        for uri, image in zip(uris, (vda, vdb), strict=True):
            assert _copy(uri, tmp_path / "out.raw") == image.read_bytes()
        # No export name: the first disk.
        assert _copy(f"nbd://127.0.0.1:{port}", tmp_path / "out.raw") == vda.read_bytes()
        listed = subprocess.run(
            ["nbdinfo", "--list", "--json", f"nbd://127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert [e["export-name"] for e in json.loads(listed)["exports"]] == ["vda", "vdb"]
        assert _pread_error(f"nbd://127.0.0.1:{port}/vdc", 0, 512) is not None
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_a_missing_object_fails_the_read_with_eio(chain: Chain, serve: Any) -> None:
    inc5 = chain.backups[5]
    regions = DiskReader(chain.repo, inc5, "vda").index.regions
    p = next(i for i, r in enumerate(regions) if r.kind is Kind.PATCHED)
    chain.repo.backend.delete(chunk_name_key(regions[p].base))  # e.g. a GC bug, a lost file
    served = serve(chain, "--backup", inc5.backup_id)
    assert _pread_error(served.uri(), p * REGION, 64 * KiB) == "EIO"
    z = next(i for i, r in enumerate(regions) if r.kind is Kind.ZERO)
    assert _pread_error(served.uri(), z * REGION, 64 * KiB) is None  # zeros need no object
    assert served.stop() == 0
    assert f"disk vda offset {p * REGION}" in served.log.read_text()


def test_a_killed_serve_takes_nbdkit_along_and_leaves_nothing_that_blocks(
    file_chain: Chain, serve: Any
) -> None:
    served = serve(file_chain)
    sock = Path(served.doc["socket"])
    pid = served.doc["nbdkit_pid"]
    served.proc.kill()
    served.proc.wait()
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)  # --exit-with-parent
    # The socket it left is stale: the next serve on the same path takes it over.
    assert sock.is_socket()
    again = subprocess.Popen(
        _cli(file_chain.config, "serve", DOMAIN, "--socket", str(sock), "--json"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert again.stdout is not None
    doc = _read_document(again.stdout)
    assert _pread_error(doc["exports"][0]["uri"], 0, 4 * KiB) is None
    again.send_signal(signal.SIGTERM)
    assert again.wait(timeout=30) == 0
    assert again.stderr is not None and "removing stale socket" in again.stderr.read()
    # The killed serve's lease names a dead process of this host: GC breaks it and runs.
    collect_garbage(file_chain.repo, grace=0)
    assert list_locks(file_chain.repo.backend) == []


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie (nbdkit's parent is gone: init reaps)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_version_1_backups_and_legacy_regions_are_served(tmp_path: Path, serve: Any) -> None:
    url = f"file://{tmp_path}/repo"
    repo = init_repository(url, chunk_size=REGION, format_version=1)
    data = image(SIZE, seed=4, chunk=REGION)
    v1 = write_full(repo, DOMAIN, {"vda": data})
    upgrade_repository(repo, None)
    repo = open_repository(url)
    rng = random.Random(5)
    disk = Disk(bytearray(data))
    disk.write(REGION + 3 * KiB, rng.randbytes(5 * KiB))
    v2 = back_up(repo, disk, v1, rng, domain=DOMAIN)
    kinds = {r.kind for r in DiskReader(repo, v2, "vda").index.regions}
    assert Kind.LEGACY in kinds
    chain = _make_config(repo, tmp_path, {"url": url}, [v1, v2])
    for manifest in (v1, v2):
        served = serve(chain, "--backup", manifest.backup_id)
        got = _copy(served.uri(), tmp_path / "out.raw")
        assert got == read_back(repo, manifest, "vda")
        assert served.stop() == 0
