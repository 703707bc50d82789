"""Chaos: backups, restores and GC killed at random points while a guest keeps writing.

Each round starts one ``vmvault`` job as a real process (backup 60%, restore 20%, gc
20%), lets it run for a random time, then sends it SIGKILL or SIGTERM, or lets it end.
Meanwhile a writer thread writes random data and zeroes to both disks through the
guest's block path and logs every write. After each round, one reaper pass
(``worker/reaper.py``, what a worker runs every minute), then:

- the guest's writes all landed: each disk equals the writer's model of it;
- nothing of vmvault is left in QEMU (devices on their disks, no vmv- node, export,
  temporary bitmap, paused guest) and no marker, journal, partial image or qemu-nbd;
- every backup committed so far holds, per disk, exactly the disk as it was after some
  prefix of the writes made while it ran (a point in time) — checked once per backup —
  and a restore that completed wrote exactly its backup;
- after a completed GC, no unreferenced object older than its grace window is left.

``make test`` runs a short variant (``VMVAULT_CHAOS_SECONDS``, default 60 s of rounds);
the long one is ``pytest -m slow tests/chaos`` (default 600 s).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.fixtures.common import VENV_BIN
from tests.fixtures.qemu import KiB, MiB, QemuVm, VmFactory
from vmvault.storage.format import CHUNKS_PREFIX
from vmvault.storage.repository import Repository, init_repository, open_repository
from vmvault.worker.cleanup import has_leftovers
from vmvault.worker.config import FleetConfig, parse_config
from vmvault.worker.reaper import reap_host
from vmvault.worker.restore_cleanup import journal_path

DISKS = {"vda": 24 * MiB, "vdb": 16 * MiB}
BLOCK = 64 * KiB
GRACE = 2.0


@dataclass
class Write:
    disk: str
    offset: int
    length: int
    byte: int  # 0: a zero write (write -z)
    done: float  # time.monotonic() when QEMU answered


@dataclass
class GuestWriter:
    """Writes to the VM's disks from a thread and keeps a model of their contents."""

    vm: QemuVm
    seed: int
    model: dict[str, bytearray] = field(default_factory=dict)
    log: list[Write] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.model = {name: bytearray(size) for name, size in DISKS.items()}
        self.rnd = random.Random(self.seed)

    def write_one(self) -> None:
        disk = self.rnd.choice(sorted(DISKS))
        length = self.rnd.choice([4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB])
        offset = self.rnd.randrange(0, DISKS[disk] - length + 1, 4 * KiB)
        byte = 0 if self.rnd.random() < 0.15 else self.rnd.randrange(1, 256)
        if byte:
            self.vm.write(disk, offset, length, pattern=byte)
        else:
            self.vm.zero(disk, offset, length)
        self.model[disk][offset : offset + length] = bytes([byte]) * length
        self.log.append(Write(disk, offset, length, byte, time.monotonic()))

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="guest-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.write_one()
                self._stop.wait(self.rnd.uniform(0.005, 0.03))
        except BaseException as err:  # surfaced by stop(): a guest write failed
            self.error = err

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)
            self._thread = None
        if self.error is not None:
            raise AssertionError(f"a guest write failed: {self.error}")


def _explain(content: bytes, start: bytearray, writes: list[Write], disk: str) -> str:
    """Where ``content`` differs from the model at its closest prefix (for the failure)."""
    model = bytearray(start)
    mine = [w for w in writes if w.disk == disk]
    best: tuple[int, list[int]] | None = None
    for k in range(len(mine) + 1):
        if k:
            w = mine[k - 1]
            model[w.offset : w.offset + w.length] = bytes([w.byte]) * w.length
        bad = [
            b for b in range(0, len(model), BLOCK) if model[b : b + BLOCK] != content[b : b + BLOCK]
        ]
        if best is None or len(bad) < len(best[1]):
            best = (k, bad)
    assert best is not None
    k, bad = best
    lines = [f"closest prefix: {k} of {len(mine)} writes to {disk}; differing 64 KiB blocks:"]
    for b in bad[:5]:
        got = sorted(set(content[b : b + BLOCK]))
        touching = [
            (i + 1, f"{w.offset}+{w.length}={w.byte}")
            for i, w in enumerate(mine)
            if w.offset < b + BLOCK and w.offset + w.length > b
        ]
        lines.append(f"  block {b}: backup holds bytes {got}; writes touching it: {touching}")
    return "\n".join(lines)


def _point_in_time(content: bytes, start: bytearray, writes: list[Write], disk: str) -> bool:
    """Is ``content`` the disk as it was after some prefix of ``writes`` (from ``start``)?

    Tracks the 64 KiB blocks where the model differs from ``content`` while the writes
    are applied one by one: empty at any step means that step was the point in time.
    """
    model = bytearray(start)
    blocks = range(0, len(model), BLOCK)
    bad = {b for b in blocks if model[b : b + BLOCK] != content[b : b + BLOCK]}
    if not bad:
        return True
    for w in writes:
        if w.disk != disk:
            continue
        model[w.offset : w.offset + w.length] = bytes([w.byte]) * w.length
        first = w.offset - w.offset % BLOCK
        for b in range(first, w.offset + w.length, BLOCK):
            if model[b : b + BLOCK] == content[b : b + BLOCK]:
                bad.discard(b)
            else:
                bad.add(b)
        if not bad:
            return True
    return False


def _backup_content(repo: Repository, backup_id: str, disk: str) -> bytes:
    manifest = repo.load_manifest("vm", backup_id)
    out = bytearray(manifest.disk(disk).virtual_size)
    for offset, data in repo.read_disk(manifest, disk):
        if data is not None:
            out[offset : offset + len(data)] = data
    return bytes(out)


def _assert_no_vmvault_state(vm: QemuVm, config: FleetConfig, restore_dir: Path) -> None:
    ctl = vm.ctl
    assert ctl.query_status() == "running"
    roots = {
        str(dev["qdev"]).split("/")[3]: str(dev["inserted"]["node-name"])
        for dev in ctl.query_block()
        if dev.get("inserted")
    }
    assert roots == {name: disk.node for name, disk in vm.disks.items()}
    assert ctl.block_exports() == [] and ctl.block_jobs() == []
    assert not [n.node_name for n in ctl.named_block_nodes() if n.node_name.startswith("vmv-")]
    for node in ctl.named_block_nodes():
        assert not [b.name for b in node.bitmaps if b.name.startswith("vmvault.tmp-")]
        recording = [b for b in node.bitmaps if b.name.startswith("vmvault-") and b.recording]
        assert len(recording) <= 1, recording
    assert not has_leftovers(config.state_dir, "vm")
    assert not journal_path(config.state_dir, "vm").exists()
    assert not list((config.state_dir / "scratch").glob("*/*"))
    assert not list(restore_dir.rglob("*.partial"))
    nbd = subprocess.run(["pgrep", "-f", f"qemu-nbd.*{config.state_dir}"], capture_output=True)
    assert nbd.returncode == 1, f"orphan qemu-nbd: {nbd.stdout!r}"


def _assert_gc_left_no_old_garbage(repo_url: str, gc_started: float) -> None:
    with open_repository(repo_url) as repo:
        referenced: set[str] = set()
        for manifest in repo.list_manifests():
            for disk in manifest.disks:
                referenced.update(d for d in repo.chunk_names(manifest, disk.name) if d)
        cutoff = gc_started - GRACE
        for info in repo.backend.list(CHUNKS_PREFIX):
            digest = info.key.rsplit("/", 1)[-1]
            if digest not in referenced:
                assert info.modified.timestamp() > cutoff, f"gc left {info.key}"


def _run_chaos(
    qemu_vm_factory: VmFactory, tmp_path: Path, state_dir: Path, seconds: float, seed: int
) -> dict[str, int]:
    rnd = random.Random(seed)
    vm = qemu_vm_factory(disk_sizes=list(DISKS.values()), name="vm")
    repo_url = f"file://{tmp_path / 'repo'}"
    init_repository(repo_url, chunk_size=1 * MiB).close()
    config = parse_config(
        {
            "repository": {"url": repo_url},
            "state_dir": str(state_dir),
            "domains": {"vm": {"host": "hv1", "qmp": str(vm.qmp_path)}},
            "backup": {"io_timeout_seconds": 30, "min_free_mib": 1},
        },
        "chaos",
    )
    cfg = tmp_path / "vmvault.yaml"
    cfg.write_text(json.dumps(config.model_dump(mode="json")))
    restore_dir = tmp_path / "restored"
    writer = GuestWriter(vm, seed)
    for _ in range(40):  # some data before the first backup
        writer.write_one()
    checked: set[str] = set()
    counts: dict[str, int] = {}
    deadline = time.monotonic() + seconds
    rounds = 0
    while time.monotonic() < deadline:
        job = rnd.choices(["backup", "restore", "gc"], weights=[6, 2, 2])[0]
        fate = rnd.choice(["SIGKILL", "SIGTERM", "end"])
        if rounds == 0:
            job, fate = "backup", "end"  # something to restore and collect around
        rounds += 1
        argv = {
            "backup": ["backup", "vm"],
            "restore": ["restore", "vm", "--to", str(restore_dir), "--force"],
            "gc": ["gc", "--grace", str(GRACE)],
        }[job]
        start_model = {d: bytearray(m) for d, m in writer.model.items()}
        first_write = len(writer.log)
        writer.start()
        started = time.monotonic()
        proc = subprocess.Popen(
            [str(VENV_BIN / "vmvault"), *argv, "--config", str(cfg), "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        if fate != "end":
            try:
                proc.wait(rnd.uniform(0.0, 1.5))
            except subprocess.TimeoutExpired:
                proc.send_signal(getattr(signal, fate))
        out, err = proc.communicate(timeout=180)
        ended = time.monotonic()
        writer.stop()
        counts[f"{job} {fate} rc={proc.returncode}"] = (
            counts.get(f"{job} {fate} rc={proc.returncode}", 0) + 1
        )
        if fate == "end":
            assert proc.returncode == 0, f"{job} failed on its own: {err.decode()}"
        reap_host(config, "hv1")
        _assert_no_vmvault_state(vm, config, restore_dir)
        for disk in DISKS:
            image = vm.capture(disk, tmp_path / f"{disk}.raw").read_bytes()
            assert image == bytes(writer.model[disk]), f"a guest write to {disk} was lost"
        window = [w for w in writer.log[first_write:] if w.done <= ended]
        with open_repository(repo_url) as repo:
            for manifest in repo.list_manifests("vm"):
                if manifest.backup_id in checked:
                    continue
                for disk in DISKS:
                    content = _backup_content(repo, manifest.backup_id, disk)
                    assert _point_in_time(content, start_model[disk], window, disk), (
                        f"round {rounds} ({job} {fate}): backup {manifest.backup_id} disk {disk}"
                        " is no point in time\n"
                        + _explain(content, start_model[disk], window, disk)
                    )
                checked.add(manifest.backup_id)
            if job == "restore" and proc.returncode == 0:
                restored = json.loads(out)
                for disk in restored["disks"]:
                    raw = tmp_path / f"restored-{disk['name']}.raw"
                    subprocess.run(
                        ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", disk["path"], str(raw)],
                        check=True,
                    )
                    expected = _backup_content(repo, restored["backup_id"], disk["name"])
                    assert raw.read_bytes() == expected, f"restore of {disk['name']} differs"
        if job == "gc" and proc.returncode == 0:
            _assert_gc_left_no_old_garbage(repo_url, started)
        time.sleep(rnd.uniform(0, GRACE / 2))
    counts["backups checked"] = len(checked)
    return counts


def _seconds(default: float) -> float:
    return float(os.environ.get("VMVAULT_CHAOS_SECONDS", default))


def test_chaos_short(qemu_vm_factory: VmFactory, tmp_path: Path, state_dir: Path) -> None:
    seed = int(os.environ.get("VMVAULT_CHAOS_SEED", random.randrange(1 << 30)))
    print(f"chaos seed {seed} (VMVAULT_CHAOS_SEED={seed} replays it)")
    counts = _run_chaos(qemu_vm_factory, tmp_path, state_dir, _seconds(60), seed)
    print(json.dumps(counts, indent=1, sort_keys=True))
    assert counts["backups checked"] >= 1


@pytest.mark.slow
def test_chaos_long(qemu_vm_factory: VmFactory, tmp_path: Path, state_dir: Path) -> None:
    seed = int(os.environ.get("VMVAULT_CHAOS_SEED", random.randrange(1 << 30)))
    print(f"chaos seed {seed}")
    counts = _run_chaos(qemu_vm_factory, tmp_path, state_dir, _seconds(600), seed)
    print(json.dumps(counts, indent=1, sort_keys=True))
