"""Where a restore may write: permissions of what it creates, and clear refusals (CLI).

Each refusal is one line on stderr, exit 1 (the operation was refused) or 2 (bad usage),
and leaves nothing behind: no image, no temporary file, no directory it made.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.restore.conftest import (
    CHUNK,
    MiB,
    images_equal,
    launch_argv,
    make_image,
    short_tmp,
    write_backup,
)
from vmvault.scheduler.cli import main
from vmvault.storage.repository import Repository, init_repository
from vmvault.worker.config import load_config
from vmvault.worker.locks import domain_lock
from vmvault.worker.restore import run_restore


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def config_file(tmp_path: Path, file_repo: Repository) -> tuple[Path, Path]:
    """A config for web1 with one 2 MiB backup, and the reference image."""
    ref = make_image(tmp_path / "vda.raw", 2 * MiB, 3, [(0, CHUNK)])
    write_backup(file_repo, "web1", {"vda": ref})
    path = tmp_path / "vmvault.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "repository": {"url": file_repo.url},
                "state_dir": str(tmp_path / "state"),
                "domains": {"web1": {"host": "hv1", "qmp": str(tmp_path / "web1.qmp")}},
            }
        )
    )
    return path, ref


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# -- permissions ---------------------------------------------------------------------------


def test_restored_images_are_private_and_new_directories_0700(
    tmp_path: Path, config_file: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path, ref = config_file
    new = tmp_path / "new" / "deeper"
    assert main(["restore", "web1", "--to", str(new), "--config", str(path)]) == 0
    assert images_equal(ref, new / "vda.qcow2")
    assert mode(new / "vda.qcow2") == 0o600
    # Every directory the restore made is 0700, parents included.
    assert mode(new) == 0o700 and mode(tmp_path / "new") == 0o700
    # A directory that already existed keeps its mode.
    existing = tmp_path / "existing"
    existing.mkdir()
    existing.chmod(0o755)
    assert main(["restore", "web1", "--to", str(existing), "--config", str(path)]) == 0
    assert mode(existing) == 0o755
    assert mode(existing / "vda.qcow2") == 0o600
    # --force replacing an image: the new one is private as well.
    (existing / "vda.qcow2").chmod(0o644)
    assert main(["restore", "web1", "--to", str(existing), "--force", "--config", str(path)]) == 0
    assert mode(existing / "vda.qcow2") == 0o600


def test_incoming_restore_images_are_private(
    tmp_path: Path, file_repo: Repository, fleet_config: object
) -> None:
    ref = make_image(tmp_path / "vda.raw", 2 * MiB, 4, [(0, CHUNK)])
    write_backup(file_repo, "web1", {"vda": ref})
    short = short_tmp()
    from vmvault.worker.config import parse_config

    config = parse_config(
        {
            "repository": {"url": file_repo.url},
            "state_dir": str(short / "st"),
            "domains": {
                "web1": {"host": "h", "qmp": str(short / "q"), "launch": {"argv": launch_argv()}}
            },
        },
        "t.yaml",
    )
    result = None
    try:
        result = run_restore(config, "web1", incoming=True)
        image = short / "st" / "images" / "web1" / "vda.qcow2"
        assert result.disks[0].path == image
        assert mode(image) == 0o600
        assert mode(image.parent) == 0o700 and mode(image.parent.parent) == 0o700
        assert images_equal(ref, image)
    finally:
        if result is not None and result.qemu is not None:
            result.qemu.kill()
        shutil.rmtree(short, ignore_errors=True)


# -- refusals ------------------------------------------------------------------------------


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A read-only tmpfs: even root cannot write there (EROFS)."""
    where = tmp_path / "ro"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_read_only_target_is_refused_in_one_line(
    config_file: tuple[Path, Path], read_only_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = config_file
    for target in (read_only_dir, read_only_dir / "sub"):
        assert main(["restore", "web1", "--to", str(target), "--config", str(path)]) == 1
        line = one_line_error(capsys)
        assert f"cannot restore into {target}" in line and "read-only file system" in line, line
    assert list(read_only_dir.iterdir()) == []


def test_target_the_user_cannot_enter_is_refused_in_one_line(tmp_path: Path) -> None:
    """A --to directory the restoring user may not enter, or not write, is refused.

    The restoring user is root without the capabilities that override file permissions
    (``setpriv --bounding-set``), and the target directories belong to ``nobody``: that
    user sees the checkout, the venv and the repository wherever they live, and still
    meets the permission checks of an ordinary user at the target.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv")
    repo = init_repository(f"file://{tmp_path}/repo", chunk_size=CHUNK)
    ref = make_image(tmp_path / "vda.raw", 1 * MiB, 6, [])
    write_backup(repo, "web1", {"vda": ref})
    repo.close()
    config = tmp_path / "vmvault.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "repository": {"url": f"file://{tmp_path}/repo"},
                "state_dir": str(tmp_path / "state"),
                "domains": {"web1": {"host": "hv1", "qmp": str(tmp_path / "q")}},
            }
        )
    )
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o700)  # nobody's: an ordinary other user may not enter it
    readonly = tmp_path / "readonly"
    readonly.mkdir(mode=0o755)  # nobody's: others may enter, not write
    os.chown(locked, 65534, 65534)
    os.chown(readonly, 65534, 65534)
    for target, reason in (
        (locked / "out", "permission denied"),
        (locked, "permission denied"),
        (readonly, "no write permission"),
        (readonly / "out", "no write permission"),
    ):
        proc = subprocess.run(
            [setpriv, "--bounding-set", "-dac_override,-dac_read_search", "--",
             sys.executable, "-m", "vmvault", "restore", "web1", "--to", str(target),
             "--config", str(config)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1, proc.stderr
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert f"cannot restore into {target}" in lines[0], lines[0]
        assert reason in lines[0], lines[0]
    assert list(locked.iterdir()) == [] and list(readonly.iterdir()) == []


def test_target_that_is_a_file_is_refused(
    tmp_path: Path, config_file: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = config_file
    plain = tmp_path / "plain"
    plain.write_text("x")
    assert main(["restore", "web1", "--to", str(plain), "--config", str(path)]) == 1
    line = one_line_error(capsys)
    assert f"cannot restore into {plain}" in line and "not a directory" in line, line


def test_empty_to_is_refused(
    tmp_path: Path, config_file: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """--to '' used to restore into the current directory."""
    path, _ = config_file
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert main(["restore", "web1", "--to", "", "--config", str(path)]) == 2
    line = one_line_error(capsys)
    assert "--to" in line and "empty" in line, line
    assert list(cwd.iterdir()) == []


def test_refused_restore_creates_no_directory(
    tmp_path: Path, config_file: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A restore refused by its checks makes no --to directory: here the domain is busy, an
    unknown disk or backup is asked for, or (--incoming) the domain's QEMU is running."""
    path, _ = config_file
    target = tmp_path / "never"
    base = ["restore", "web1", "--to", str(target), "--config", str(path)]
    config = load_config(path)
    with domain_lock(config.state_dir, "web1", job="backup"):
        assert main(base) == 1
    assert "busy" in one_line_error(capsys)
    assert main([*base, "--disk", "vdz"]) == 1
    one_line_error(capsys)
    assert main([*base, "--backup", "x"]) == 1
    one_line_error(capsys)
    assert not target.exists()
    # --incoming into a domain whose QMP socket answers.
    short = short_tmp()
    doc = yaml.safe_load(path.read_text())
    doc["domains"]["web1"]["qmp"] = str(short / "q")
    doc["domains"]["web1"]["launch"] = {"argv": launch_argv()}
    path.write_text(yaml.safe_dump(doc))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(short / "q"))
        listener.listen(1)
        assert main([*base, "--incoming"]) == 1
        assert "already listens on its QMP socket" in one_line_error(capsys)
    finally:
        listener.close()
        shutil.rmtree(short, ignore_errors=True)
    assert not target.exists()


def test_stray_partial_is_refused_unless_force(
    tmp_path: Path, config_file: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A .partial that is not our own dead restore's may be someone's data: not deleted
    without --force."""
    path, ref = config_file
    out = tmp_path / "out"
    out.mkdir()
    stray = out / "vda.qcow2.partial"
    stray.write_bytes(b"someone's upload in progress")
    assert main(["restore", "web1", "--to", str(out), "--config", str(path)]) == 1
    line = one_line_error(capsys)
    assert str(stray) in line and "--force" in line, line
    assert stray.read_bytes() == b"someone's upload in progress"
    assert main(["restore", "web1", "--to", str(out), "--force", "--config", str(path)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["vda.qcow2"]
    assert images_equal(ref, out / "vda.qcow2")


def test_backup_not_found_names_the_list_command(
    tmp_path: Path, config_file: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = config_file
    code = main(["restore", "web1", "--to", str(tmp_path / "o"), "--backup", "nope",
                 "--config", str(path)])  # fmt: skip
    assert code == 1
    line = one_line_error(capsys)
    assert "'vmvault list web1'" in line, line
    assert "vmvault backups" not in line


def test_full_target_fails_in_one_line_and_leaves_nothing(
    tmp_path: Path, config_file: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """ENOSPC while writing: exit 1, one line, no partial image left on the full disk."""
    path, _ = config_file
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(small)], check=True)
    try:
        assert main(["restore", "web1", "--to", str(small), "--config", str(path)]) == 1
        line = one_line_error(capsys)
        assert "vda" in line, line
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)
