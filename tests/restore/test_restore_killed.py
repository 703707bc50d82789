"""A restore killed (SIGKILL) or stopped (SIGTERM) mid-write: final names untouched, no litter.

Each test runs the real CLI (``python -m vmvault restore``) as a child process against a
file:// repository holding one 256 MiB backup, waits until the restore is visibly writing
(the temporary image grows), and kills it. What must hold afterwards:

- the final image names hold exactly what they held before (nothing, or the old image);
- ``remove_restore_leftovers`` (or the next restore, which calls it first) kills the
  orphan QEMU / qemu-nbd, deletes the temporary images and the ``vmvr*`` socket
  directories, and the next restore succeeds;
- a live restore (domain lock held) is never touched by it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.restore.conftest import (
    MiB,
    images_equal,
    launch_argv,
    short_tmp,
    write_backup,
)
from vmvault.storage.repository import Repository
from vmvault.worker.config import FleetConfig, load_config
from vmvault.worker.locks import domain_lock
from vmvault.worker.restore_cleanup import journal_path, remove_restore_leftovers

# Big enough that the restore is still writing when the test sees the image grow.
DISK_SIZE = 256 * MiB
GROWN = 16 * MiB


@dataclass
class Setup:
    """A config file, its parsed config, the reference image and the paths to watch."""

    config_file: Path
    config: FleetConfig
    ref: Path
    images: Path  # --to / image_dir of the domain
    state: Path
    qmp: Path


@pytest.fixture
def setup(tmp_path: Path, file_repo: Repository) -> Iterator[Setup]:
    ref = tmp_path / "vda.raw"
    with ref.open("wb") as out:
        for index in range(DISK_SIZE // (16 * MiB)):
            # A zero stretch among the data, as real disks have.
            out.write(bytes(16 * MiB) if index == 1 else os.urandom(16 * MiB))
    write_backup(file_repo, "web1", {"vda": ref})
    short = short_tmp()  # unix socket paths must stay short
    state = short / "st"
    images = tmp_path / "images"
    config_file = tmp_path / "vmvault.yaml"
    doc = {
        "repository": {"url": file_repo.url},
        "state_dir": str(state),
        "domains": {
            "web1": {
                "host": "hv1",
                "qmp": str(short / "web1.qmp"),
                "launch": {"argv": launch_argv(), "image_dir": str(images)},
            }
        },
    }
    config_file.write_text(yaml.safe_dump(doc))
    try:
        yield Setup(config_file, load_config(config_file), ref, images, state, short / "web1.qmp")
    finally:
        for pid in processes_naming(str(short)) + processes_naming(str(tmp_path)):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(short, ignore_errors=True)


def processes_naming(marker: str) -> list[int]:
    """Live (not zombie) processes whose command line mentions ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def cli(setup: Setup, *args: str) -> list[str]:
    return [sys.executable, "-m", "vmvault", "restore", "web1", *args,
            "--config", str(setup.config_file)]  # fmt: skip


def start_and_catch_writing(setup: Setup, args: list[str], image: Path) -> subprocess.Popen[str]:
    """Start the CLI; return once ``image`` (the temporary or final name) has grown."""
    proc = subprocess.Popen(cli(setup, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    watched = [image.with_name(image.name + ".partial"), image]
    deadline = time.monotonic() + 120
    while True:
        sizes = [p.stat().st_size for p in watched if p.exists()]
        if any(size > GROWN for size in sizes):
            return proc
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the restore ended before the test caught it writing: {err}{out}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the restore did not start writing within 120 s")
        time.sleep(0.005)


def leftovers(setup: Setup) -> dict[str, list[str]]:
    """Everything a restore may leave behind: processes, temporary files, socket dirs."""
    run = setup.state / "run"
    return {
        "processes": [str(p) for p in processes_naming(str(setup.images))],
        "temporary": sorted(
            p.name for p in setup.images.glob("*") if p.suffix in (".partial", ".pre-restore")
        ),
        "socket dirs": sorted(p.name for p in run.glob("vmvr*")) if run.exists() else [],
        "journal": [str(journal_path(setup.state, "web1"))]
        if journal_path(setup.state, "web1").exists()
        else [],
    }


NOTHING: dict[str, list[str]] = {
    "processes": [],
    "temporary": [],
    "socket dirs": [],
    "journal": [],
}


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def kill_final_qemu(doc: dict[str, object]) -> None:
    pid = doc.get("qemu_pid")
    if isinstance(pid, int):
        os.kill(pid, signal.SIGKILL)


def test_sigkilled_incoming_restore_leaves_the_old_image_and_rerun_succeeds(
    setup: Setup,
) -> None:
    """--force over an existing image, SIGKILL mid-write: the old image keeps its name and
    content; the next restore cleans up the orphan QEMU and the temporary image first."""
    setup.images.mkdir(mode=0o755)
    image = setup.images / "vda.qcow2"
    image.write_bytes(b"precious")
    proc = start_and_catch_writing(setup, ["--incoming", "--force"], image)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert image.read_bytes() == b"precious"
    assert sorted(p.name for p in setup.images.iterdir()) == ["vda.qcow2", "vda.qcow2.partial"]
    # The killed restore's QEMU is an orphan now; the domain's QMP socket stays free.
    assert leftovers(setup)["processes"], "expected the killed restore's QEMU to be left"
    assert not setup.qmp.exists()

    rerun = subprocess.run(cli(setup, "--incoming", "--force", "--json"), capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    doc = json.loads(rerun.stdout)
    try:
        assert doc["state"] == "paused-incoming" and doc["disks"][0]["verified"]
        assert "removed the leftovers of an earlier restore" in rerun.stderr
        assert images_equal(setup.ref, image)
        # Only the handed-over QEMU runs, on the final name, paused in incoming mode.
        assert leftovers(setup)["processes"] == [str(doc["qemu_pid"])]
        assert {**leftovers(setup), "processes": []} == NOTHING
        assert sorted(p.name for p in setup.images.iterdir()) == ["vda.qcow2"]
    finally:
        kill_final_qemu(doc)


def test_remove_restore_leftovers_after_sigkill(setup: Setup) -> None:
    """The reaper's entry point: undoes a dead restore, never a live one."""
    image = setup.images / "vda.qcow2"
    proc = start_and_catch_writing(setup, ["--incoming"], image)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not image.exists()
    orphans = leftovers(setup)["processes"]
    assert orphans
    # While something holds the domain lock (a live restore), nothing is touched.
    with domain_lock(setup.state, "web1", job="restore"):
        assert remove_restore_leftovers(setup.config, "web1") == []
    assert leftovers(setup)["processes"] == orphans

    removed = remove_restore_leftovers(setup.config, "web1")
    text = "\n".join(removed)
    assert any(f"pid {orphans[0]}" in line and "killed" in line for line in removed), text
    assert f"{image}.partial" in text
    assert "vmvr-web1-" in text
    assert leftovers(setup) == NOTHING
    assert list(setup.images.iterdir()) == []
    # Nothing left to do the second time.
    assert remove_restore_leftovers(setup.config, "web1") == []


def test_sigterm_incoming_restore_tears_down_at_once(setup: Setup) -> None:
    """SIGTERM (systemd stop) undoes what the restore set up, like Ctrl-C: nothing is left
    for a reaper, and the message says what happened in one line."""
    setup.images.mkdir()
    image = setup.images / "vda.qcow2"
    image.write_bytes(b"precious")
    proc = start_and_catch_writing(setup, ["--incoming", "--force"], image)
    os.kill(proc.pid, signal.SIGTERM)
    code, _, err = finish(proc)
    assert code == 128 + signal.SIGTERM, err
    lines = err.strip().splitlines()
    assert lines == ["vmvault: stopped by SIGTERM; what the job had set up was removed"], err
    assert "Traceback" not in err
    assert image.read_bytes() == b"precious"
    assert leftovers(setup) == NOTHING
    assert sorted(p.name for p in setup.images.iterdir()) == ["vda.qcow2"]


def test_sigkilled_restore_to_files_leaves_nothing_after_cleanup(
    setup: Setup, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    image = out / "vda.qcow2"
    proc = start_and_catch_writing(setup, ["--to", str(out)], image)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not image.exists()
    rerun = subprocess.run(cli(setup, "--to", str(out)), capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    assert images_equal(setup.ref, image)
    assert sorted(p.name for p in out.iterdir()) == ["vda.qcow2"]
    assert processes_naming(str(out)) == []
    run = setup.state / "run"
    assert list(run.glob("vmvr*")) == []
    assert not journal_path(setup.state, "web1").exists()
