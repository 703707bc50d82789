"""Backups under bad input and faults, against a real QEMU: each ends correct or clearly refused."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

import pytest

from tests.fixtures.qemu import KiB, MiB
from tests.worker.conftest import CHUNK, BackupEnv, make_config
from vmvault.scheduler.cli import main as cli_main
from vmvault.storage.errors import StorageError
from vmvault.worker.backup import BackupError, IncrementalUnavailableError, run_backup
from vmvault.worker.checkpoints import PREFIX
from vmvault.worker.config import UnknownDomainError
from vmvault.worker.locks import DomainBusyError, domain_lock
from vmvault.worker.qmp import QmpConnectError

DISKS = ("vda", "vdb")


def _refs(env: BackupEnv) -> dict[str, bytes]:
    return {d: env.capture(d) for d in DISKS}


def _vmvault_bitmaps(env: BackupEnv, disk: str) -> list[str]:
    nodes = env.vm.ctl.named_block_nodes()
    node = next(n for n in nodes if n.node_name == env.vm.disks[disk].node)
    return [b.name for b in node.bitmaps if b.name.startswith(PREFIX)]


def _device_roots(env: BackupEnv) -> dict[str, str]:
    """The node each guest device reads and writes through (its root node)."""
    return {
        str(dev["qdev"]).split("/")[3]: str(dev["inserted"]["node-name"])
        for dev in env.vm.ctl.query_block()
        if dev.get("inserted")
    }


def _assert_clean(env: BackupEnv) -> None:
    """No temporary QEMU object or file of a backup is left behind; the guest runs."""
    ctl = env.vm.ctl
    assert ctl.query_status() == "running"
    assert _device_roots(env) == {d: env.vm.disks[d].node for d in DISKS}
    assert ctl.block_exports() == [] and ctl.block_jobs() == []
    assert not any(n.node_name.startswith("vmv-") for n in ctl.named_block_nodes())
    for disk in DISKS:
        node = next(n for n in ctl.named_block_nodes() if n.node_name == env.vm.disks[disk].node)
        assert not any(b.name.startswith("vmvault.tmp-") for b in node.bitmaps)
    assert not list((env.config.state_dir / "scratch").glob("*/*"))


def test_unknown_domain_and_cli_exit_code(backup_env: BackupEnv, tmp_path: Path) -> None:
    with pytest.raises(UnknownDomainError, match="unknown domain 'nope'"):
        run_backup(backup_env.config, "nope")
    cfg = tmp_path / "vmvault.yaml"
    cfg.write_text(json.dumps(backup_env.config.model_dump(mode="json")))
    assert cli_main(["backup", "nope", "--config", str(cfg)]) == 2


def test_socket_missing_not_qemu_and_not_running(backup_env: BackupEnv, tmp_path: Path) -> None:
    env = backup_env
    sockdir = Path(tempfile.mkdtemp(prefix="vmvf"))
    try:
        missing = make_config(env.vm, env.repo_url, env.config.state_dir)
        missing = missing.model_copy(
            update={
                "domains": {
                    "vm": missing.domains["vm"].model_copy(update={"qmp": sockdir / "missing.sock"})
                }
            }
        )
        with pytest.raises(QmpConnectError, match="does not exist"):
            run_backup(missing, "vm")

        # A unix socket that talks something else than QMP.
        path = sockdir / "http.sock"
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
        server.listen(1)

        def talk() -> None:
            conn, _ = server.accept()
            conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nhello\n")
            conn.close()

        thread = threading.Thread(target=talk, daemon=True)
        thread.start()
        other = missing.model_copy(
            update={"domains": {"vm": missing.domains["vm"].model_copy(update={"qmp": path})}}
        )
        with pytest.raises(QmpConnectError, match="domain 'vm'"):
            run_backup(other, "vm")
        server.close()
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)

    # QEMU dead, its socket file left behind (SIGKILL): refused, "is the domain running?".
    env.vm.kill()
    assert env.vm.qmp_path.exists()
    with pytest.raises(QmpConnectError, match="running"):
        run_backup(env.config, "vm")


def test_incremental_mode_fails_clearly_without_a_chain(backup_env: BackupEnv) -> None:
    with pytest.raises(IncrementalUnavailableError, match="first backup"):
        run_backup(backup_env.config, "vm", mode="incremental")
    assert _vmvault_bitmaps(backup_env, "vda") == []


def test_writes_during_the_pull_do_not_leak(backup_env: BackupEnv) -> None:
    env, vm = backup_env, backup_env.vm
    vm.write("vda", 0, 4 * MiB, pattern=0x11)
    vm.write("vdb", 2 * MiB, 1 * MiB, pattern=0x12)
    before = _refs(env)
    wrote: list[bool] = []

    def meddle(phase: str, done: int, total: int) -> None:
        if not wrote:  # first progress report: the export is live, nothing read yet
            wrote.append(True)
            vm.write("vda", 0, 16 * MiB, pattern=0xEE)
            vm.write("vdb", 0, 8 * MiB, pattern=0xEF)

    full = run_backup(env.config, "vm", progress=meddle)
    assert wrote
    env.assert_matches(env.manifest(full.backup_id), before)
    # The guest's writes went to the live disks, and the next incremental carries them.
    after = _refs(env)
    assert after["vda"] == b"\xee" * (16 * MiB)
    inc = run_backup(env.config, "vm")
    assert inc.kind == "incremental"
    env.assert_matches(env.manifest(inc.backup_id), after)


def test_qemu_killed_during_backup(backup_env: BackupEnv) -> None:
    env, vm = backup_env, backup_env.vm
    vm.write("vda", 1 * MiB, 2 * MiB, pattern=0x21)
    run_backup(env.config, "vm")
    vm.write("vda", 8 * MiB, 1 * MiB, pattern=0x22)

    def kill(phase: str, done: int, total: int) -> None:
        vm.kill()

    with pytest.raises(BackupError, match=r"domain 'vm'.*pulling"):
        run_backup(env.config, "vm", progress=kill)
    assert not list((env.config.state_dir / "scratch").glob("*/*"))
    with env.repo() as repo:
        assert len(repo.list_manifests("vm")) == 1
    vm.restart()
    refs = _refs(env)
    # Bitmaps added since QEMU started were never stored in the qcow2: they are gone.
    result = run_backup(env.config, "vm")
    assert result.kind == "full" and "missing on disk" in result.reason
    env.assert_matches(env.manifest(result.backup_id), refs)
    _assert_clean(env)


def test_clean_restart_keeps_the_chain_unclean_restart_gives_full(backup_env: BackupEnv) -> None:
    env, vm = backup_env, backup_env.vm
    vm.write("vda", 0, 1 * MiB, pattern=0x23)
    run_backup(env.config, "vm")
    vm.quit()  # persistent bitmaps are stored in the qcow2
    vm.restart()
    vm.write("vdb", 1 * MiB, 64 * KiB, pattern=0x24)
    refs = _refs(env)
    inc = run_backup(env.config, "vm")
    assert inc.kind == "incremental"
    assert {d.name: d.dirty_bytes for d in inc.disks} == {"vda": 0, "vdb": 64 * KiB}
    env.assert_matches(env.manifest(inc.backup_id), refs)
    vm.quit()
    vm.restart()  # bitmaps loaded from the image are marked in use there...
    vm.write("vda", 2 * MiB, 64 * KiB, pattern=0x25)
    vm.kill()  # ...and an unclean exit leaves them inconsistent
    vm.restart()
    refs = _refs(env)
    result = run_backup(env.config, "vm")
    assert result.kind == "full"
    assert "inconsistent" in result.reason and "unclean" in result.reason
    env.assert_matches(env.manifest(result.backup_id), refs)
    # The chain was started afresh: one sound checkpoint per disk.
    assert _vmvault_bitmaps(env, "vda") == [f"{PREFIX}{result.checkpoint}"]
    _assert_clean(env)


def test_storage_failing_mid_upload_then_next_backup_is_correct(backup_env: BackupEnv) -> None:
    env, vm = backup_env, backup_env.vm
    vm.write("vda", 0, 2 * MiB, pattern=0x31)
    full = run_backup(env.config, "vm")
    vm.write("vda", 5 * MiB, 3 * MiB, pattern=0x32)
    vm.write("vdb", 0, 1 * MiB, pattern=0x33)
    chunks = Path(env.repo_url.removeprefix("file://")) / "chunks"

    def break_storage(phase: str, done: int, total: int) -> None:
        if not (chunks.parent / "chunks.away").exists():
            chunks.rename(chunks.parent / "chunks.away")
            chunks.write_bytes(b"not a directory")  # every chunk write now fails

    with pytest.raises(BackupError, match="pulling") as info:
        run_backup(env.config, "vm", progress=break_storage)
    assert isinstance(info.value.__cause__, StorageError)
    _assert_clean(env)
    chunks.unlink()
    (chunks.parent / "chunks.away").rename(chunks)
    with env.repo() as repo:
        assert [m.backup_id for m in repo.list_manifests("vm")] == [full.backup_id]
    # The failed backup's checkpoint stays: the chain now has two, the next diff merges both.
    assert len(_vmvault_bitmaps(env, "vda")) == 2
    vm.write("vdb", 7 * MiB, 64 * KiB, pattern=0x34)
    refs = _refs(env)
    inc = run_backup(env.config, "vm")
    assert inc.kind == "incremental" and inc.parent == full.backup_id
    env.assert_matches(env.manifest(inc.backup_id), refs)
    assert len(_vmvault_bitmaps(env, "vda")) == 1


def test_bitmap_removed_by_hand_gives_full_with_reason(backup_env: BackupEnv) -> None:
    env, vm = backup_env, backup_env.vm
    vm.write("vdb", 0, 1 * MiB, pattern=0x41)
    run_backup(env.config, "vm")
    (name,) = _vmvault_bitmaps(env, "vdb")
    vm.ctl.bitmap_remove(vm.disks["vdb"].node, name)
    vm.write("vdb", 3 * MiB, 64 * KiB, pattern=0x42)
    refs = _refs(env)
    result = run_backup(env.config, "vm")
    assert result.kind == "full" and "missing on disk vdb" in result.reason
    env.assert_matches(env.manifest(result.backup_id), refs)
    with env.repo() as repo:
        assert repo.load_manifest("vm", result.backup_id).reason == result.reason


def test_resized_disks_stay_incremental_and_exact(backup_env: BackupEnv) -> None:
    """Format 2: a grow or a shrink, mid-chunk and mid-sub-block, is an incremental that
    reads about what changed (the boundary sub-block and the written bytes)."""
    env, vm = backup_env, backup_env.vm
    vm.write("vdb", 0, 1 * MiB, pattern=0x51)
    vm.write("vdb", 4 * MiB, 2 * MiB, pattern=0x50)
    first_refs = _refs(env)
    first = run_backup(env.config, "vm")
    new_size = 12 * MiB + 320 * KiB  # the last chunk is a short tail
    vm.resize("vdb", new_size)
    vm.write("vdb", 12 * MiB, 320 * KiB, pattern=0x52)
    grown_refs = refs = _refs(env)
    grown = run_backup(env.config, "vm")
    assert grown.kind == "incremental" and grown.parent == first.backup_id, grown.reason
    vdb = {d.name: d for d in grown.disks}["vdb"]
    assert vdb.virtual_size == new_size and vdb.bytes_read == 320 * KiB
    env.assert_matches(env.manifest(grown.backup_id), refs)

    shrunk_size = 5 * MiB + 100 * KiB + 512  # inside the written range, mid-sub-block
    vm.resize("vdb", shrunk_size)
    vm.write("vdb", 12 * KiB, 4 * KiB, pattern=0x53)
    refs = _refs(env)
    shrunk = run_backup(env.config, "vm")
    assert shrunk.kind == "incremental" and shrunk.parent == grown.backup_id, shrunk.reason
    vdb = {d.name: d for d in shrunk.disks}["vdb"]
    # The write, and the new boundary region (rewritten whole: the old one's data is
    # far more than the short region holds, section 24 rule 7).
    assert vdb.virtual_size == shrunk_size
    assert vdb.bytes_read == 64 * KiB + shrunk_size % CHUNK
    env.assert_matches(env.manifest(shrunk.backup_id), refs)
    # Every backup still restores from its own index, at its own size.
    env.assert_matches(env.manifest(first.backup_id), first_refs)
    env.assert_matches(env.manifest(grown.backup_id), grown_refs)


def test_foreign_bitmaps_are_left_alone(backup_env: BackupEnv) -> None:
    env, vm = backup_env, backup_env.vm
    node = vm.disks["vda"].node
    vm.ctl.bitmap_add(node, "other-tool", persistent=True)
    vm.ctl.bitmap_add(node, "other-frozen", persistent=False, disabled=True)
    vm.write("vda", 0, 64 * KiB, pattern=0x61)
    run_backup(env.config, "vm")
    vm.write("vda", 1 * MiB, 64 * KiB, pattern=0x62)
    run_backup(env.config, "vm")
    nodes = {n.node_name: n for n in vm.ctl.named_block_nodes()}
    foreign = {b.name: b for b in nodes[node].bitmaps if not b.name.startswith(PREFIX)}
    assert set(foreign) == {"other-tool", "other-frozen"}
    assert foreign["other-tool"].recording and foreign["other-tool"].count == 128 * KiB
    assert not foreign["other-frozen"].recording and foreign["other-frozen"].count == 0


def test_two_backups_at_once_the_second_is_refused(backup_env: BackupEnv) -> None:
    env, vm = backup_env, backup_env.vm
    vm.write("vda", 0, 2 * MiB, pattern=0x71)
    refs = _refs(env)
    refused: list[Exception] = []

    def second(phase: str, done: int, total: int) -> None:
        if not refused:
            with pytest.raises(DomainBusyError, match="domain 'vm' is busy") as info:
                run_backup(env.config, "vm")
            refused.append(info.value)

    first = run_backup(env.config, "vm", progress=second)
    assert refused and "pid" in str(refused[0])
    env.assert_matches(env.manifest(first.backup_id), refs)
    with domain_lock(env.config.state_dir, "vm", "restore"), pytest.raises(DomainBusyError):
        run_backup(env.config, "vm")


def test_leftovers_of_a_sigkilled_worker_are_removed(backup_env: BackupEnv, tmp_path: Path) -> None:
    env, vm = backup_env, backup_env.vm
    vm.write("vda", 0, 3 * MiB, pattern=0x81)
    cfg = tmp_path / "vmvault.yaml"
    cfg.write_text(json.dumps(env.config.model_dump(mode="json")))
    script = textwrap.dedent(
        f"""
        import os, signal
        from vmvault.worker.config import load_config
        from vmvault.worker.backup import run_backup
        def die(phase, done, total):
            os.kill(os.getpid(), signal.SIGKILL)
        run_backup(load_config({str(cfg)!r}), "vm", progress=die)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[2])
    assert proc.returncode == -signal.SIGKILL
    # The dead worker's exports, and its fleecing filters in front of the guest's disks.
    assert vm.ctl.block_exports()
    assert all(root.startswith("vmv-c-") for root in _device_roots(env).values())
    assert list((env.config.state_dir / "scratch").glob("*/*"))
    refs = _refs(env)
    result = run_backup(env.config, "vm")
    assert result.leftovers_removed and result.kind == "full"
    env.assert_matches(env.manifest(result.backup_id), refs)
    _assert_clean(env)
    assert os.path.exists(env.config.state_dir / "locks" / "vm.lock")


def test_shrink_then_grow_back_between_backups(backup_env: BackupEnv) -> None:
    """Same size as the parent, but the tail was cut and regrown: it must read as zeros."""
    env, vm = backup_env, backup_env.vm
    vm.write("vda", 10 * MiB, 1 * MiB, pattern=0x71)
    full = run_backup(env.config, "vm")
    vm.resize("vda", 8 * MiB)
    vm.resize("vda", 16 * MiB)
    refs = _refs(env)
    assert refs["vda"][10 * MiB : 11 * MiB] == bytes(1 * MiB)
    inc = run_backup(env.config, "vm")
    assert inc.kind == "incremental" and inc.parent == full.backup_id
    env.assert_matches(env.manifest(inc.backup_id), refs)


def test_a_stale_qmp_socket_is_one_line_without_qemu_qmp_noise(
    backup_env: BackupEnv, tmp_path: Path
) -> None:
    """qemu.qmp logs its own ERROR lines for a failed connection; the CLI prints only
    vmvault's message, which names the domain and the socket."""
    env = backup_env
    env.vm.kill()  # the socket file stays behind, nothing listens
    cfg = tmp_path / "vmvault.yaml"
    cfg.write_text(json.dumps(env.config.model_dump(mode="json")))
    proc = subprocess.run(
        [sys.executable, "-m", "vmvault", "backup", "vm", "--config", str(cfg)],
        cwd=Path(__file__).parents[2],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("vmvault: error: domain 'vm': nothing listens on QMP socket")
