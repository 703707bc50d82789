"""The repository commands through ``vmvault`` (in-process ``main``), on a file:// repository."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from scheduler.cli import main
from storage.repository import open_repository
from tests.storage.conftest import CHUNK
from tests.storage.helpers import write_full


def _config(tmp_path: Path, passphrase: bytes | None = None) -> tuple[Path, str]:
    url = f"file://{tmp_path}/repo"
    lines = ["repository:", f"  url: {url}"]
    if passphrase is not None:
        (tmp_path / "pass").write_bytes(passphrase + b"\n")
        lines.append(f"  passphrase_file: {tmp_path / 'pass'}")
    path = tmp_path / "vmvault.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path, url


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, (json.loads(out) if "--json" in argv and out else out), err


def test_init_list_show_verify_prune_gc(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg, url = _config(tmp_path, b"s3cret")
    c = str(cfg)
    code, doc, _ = _run(capsys, "init", "--config", c, "--chunk-size", "64K", "--json")
    assert code == 0 and doc["encrypted"] is True and doc["chunk_size"] == CHUNK
    code, _, err = _run(capsys, "init", "--config", c)
    assert code == 1 and "already holds a repository" in err

    repo = open_repository(url, passphrase=b"s3cret")
    made = [write_full(repo, "web1", {"vda": os.urandom(2 * CHUNK)}) for _ in range(3)]
    write_full(repo, "db1", {"vda": os.urandom(CHUNK)})

    code, doc, _ = _run(capsys, "list", "web1", "--config", c, "--json")
    assert code == 0 and [b["backup_id"] for b in doc] == [m.backup_id for m in made]
    code, doc, _ = _run(capsys, "list", "--config", c, "--json")
    assert len(doc) == 4
    code, text, err = _run(capsys, "list", "--config", c)
    assert code == 0 and made[0].backup_id in err + text

    code, doc, _ = _run(capsys, "show", made[1].backup_id, "--config", c, "--json")
    assert code == 0 and doc["domain"] == "web1" and doc["disks"][0]["name"] == "vda"
    code, _, err = _run(capsys, "show", "20200101T000000.000000Z-00000000", "--config", c)
    assert code == 1 and "no committed backup" in err

    code, doc, _ = _run(capsys, "verify", "--read-data", "--config", c, "--json")
    assert code == 0 and doc["ok"] and doc["chunks_read"] == 7

    dry = ("prune", "web1", "--keep-last", "1", "--dry-run", "--config", c)
    code, doc, _ = _run(capsys, *dry, "--json")
    assert code == 0 and doc["remove"] == 2 and doc["removed"] == []
    assert len(repo.list_manifests("web1")) == 3
    code, text, err = _run(capsys, *dry)
    assert "would remove" in text and "last" in text
    code, doc, _ = _run(capsys, "prune", "web1", "--keep-last", "1", "--config", c, "--json")
    assert doc["removed"] == [m.backup_id for m in made[:2]]
    assert [m.backup_id for m in repo.list_manifests("web1")] == [made[2].backup_id]
    code, _, err = _run(capsys, "prune", "--config", c)
    assert code == 2 and "--keep" in err

    code, doc, _ = _run(capsys, "gc", "--grace", "0", "--config", c, "--json")
    assert code == 0 and doc["chunks_deleted"] == 4 and doc["chunks_referenced"] == 3
    code, doc, _ = _run(capsys, "verify", "--config", c, "--json")
    assert code == 0 and doc["ok"]


def test_verify_exit_code_and_problem_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, url = _config(tmp_path)
    assert main(["init", "--config", str(cfg), "--chunk-size", "65536"]) == 0
    repo = open_repository(url)
    m = write_full(repo, "vm", {"vda": os.urandom(2 * CHUNK)})
    digest = repo.index_digests(m, "vda")[1]
    assert digest is not None
    repo.backend.delete(f"chunks/{digest[:2]}/{digest}")
    capsys.readouterr()
    code, text, _ = _run(capsys, "verify", "--config", str(cfg))
    assert code == 1
    assert f"problem: vm {m.backup_id} disk vda offset {CHUNK}: chunk {digest} is missing" in text


def test_wrong_passphrase_and_missing_repository(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, _ = _config(tmp_path, b"right")
    code, _, err = _run(capsys, "list", "--config", str(cfg))
    assert code == 1 and "run 'vmvault init' first" in err
    assert main(["init", "--config", str(cfg)]) == 0
    (tmp_path / "pass").write_bytes(b"wrong\n")
    code, _, err = _run(capsys, "list", "--config", str(cfg))
    assert code == 1 and "wrong passphrase" in err
    code, _, err = _run(capsys, "init", "--config", str(cfg), "--chunk-size", "3M")
    assert code == 1 and "power of two" in err


def test_passwd_rewraps_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg, url = _config(tmp_path, b"old-pass")
    assert main(["init", "--config", str(cfg), "--chunk-size", "64K"]) == 0
    capsys.readouterr()
    m = write_full(open_repository(url, passphrase=b"old-pass"), "vm", {"vda": os.urandom(CHUNK)})
    (tmp_path / "new").write_bytes(b"new-pass\n")
    code, doc, _ = _run(capsys, "passwd", "--new-passphrase-file", str(tmp_path / "new"),
                        "--config", str(cfg), "--json")  # fmt: skip
    assert code == 0 and doc["changed"]
    code, _, err = _run(capsys, "list", "--config", str(cfg))
    assert code == 1 and "wrong passphrase" in err
    assert open_repository(url, passphrase=b"new-pass").find_backup(m.backup_id).domain == "vm"
    code, _, err = _run(capsys, "passwd", "--new-passphrase-file", str(tmp_path / "nope"),
                        "--config", str(cfg))  # fmt: skip
    assert code == 1 and "cannot read --new-passphrase-file" in err


def test_passwd_with_the_same_passphrase_binds_an_old_key_object(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The documented way to add the config binding to a repository made before it."""
    from storage.format import CONFIG_KEY, KEY_KEY
    from tests.storage.test_config_binding import _legacy_key_object, _master

    cfg, url = _config(tmp_path, b"pw")
    assert main(["init", "--config", str(cfg), "--chunk-size", "64K"]) == 0
    repo = open_repository(url, passphrase=b"pw")
    repo.backend.put(KEY_KEY, _legacy_key_object(b"pw", repo.config.id, _master(repo)))
    capsys.readouterr()
    code, _, _ = _run(capsys, "passwd", "--new-passphrase-file", str(tmp_path / "pass"),
                      "--config", str(cfg))  # fmt: skip
    assert code == 0
    assert json.loads(repo.backend.get(KEY_KEY))["version"] == 2
    repo.backend.put(CONFIG_KEY, repo.backend.get(CONFIG_KEY) + b" ")
    code, _, err = _run(capsys, "list", "--config", str(cfg))
    assert code == 1 and "config object was altered" in err and len(err.splitlines()) == 1
