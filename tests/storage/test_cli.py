"""The repository commands through ``vmvault`` (in-process ``main``), on a file:// repository."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.s3 import S3Bucket
from tests.storage.conftest import CHUNK
from tests.storage.helpers import read_back, write_full
from vmvault.scheduler.cli import main
from vmvault.storage.repository import init_repository, open_repository


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
    digest = repo.chunk_names(m, "vda")[1]
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
    from tests.storage.test_config_binding import _legacy_key_object, _master
    from vmvault.storage.format import CONFIG_KEY, KEY_KEY

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


# --------------------------------------------------------------------------- clear errors
# Each expected failure: one line on stderr naming the thing and what to do, exit 1 or 2,
# no traceback.


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _s3_config(tmp_path: Path, url: str, endpoint: str) -> Path:
    path = tmp_path / "vmvault.yaml"
    path.write_text(f"repository:\n  url: {url}\n  endpoint_url: {endpoint}\n")
    return path


def test_s3_bucket_name_with_a_space(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _s3_config(tmp_path, "s3://my bucket/vm", "http://127.0.0.1:9")
    code, _, err = _run(capsys, "list", "--config", str(cfg))
    assert code == 2
    assert "bucket name 'my bucket'" in _one_line(err)
    from vmvault.storage.backends import open_backend
    from vmvault.storage.errors import StorageError

    with pytest.raises(StorageError, match="bucket name 'my bucket'"):
        open_backend("s3://my bucket/vm", endpoint_url="http://127.0.0.1:9")


def test_no_aws_credentials_at_all(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    s3_server: S3Bucket,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role here
    cfg = _s3_config(tmp_path, s3_server.repo_url(), s3_server.endpoint_url)
    for command in ("init", "list"):
        code, _, err = _run(capsys, command, "--config", str(cfg))
        line = _one_line(err)
        assert code == 1 and "no AWS credentials" in line and "AWS_ACCESS_KEY_ID" in line


def test_missing_bucket_is_not_answered_with_run_init(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], s3_server: S3Bucket
) -> None:
    cfg = _s3_config(tmp_path, "s3://no-such-bucket-vmv/repo", s3_server.endpoint_url)
    for command in ("list", "init"):
        code, _, err = _run(capsys, command, "--config", str(cfg))
        line = _one_line(err)
        assert code == 1, err
        assert "bucket 'no-such-bucket-vmv' does not exist" in line and "create it" in line
        assert "vmvault init" not in line


def test_bad_scrypt_parameters_in_the_key_object(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vmvault.storage.format import KEY_KEY

    cfg, _ = _config(tmp_path, b"pw")
    assert main(["init", "--config", str(cfg), "--chunk-size", "64K"]) == 0
    capsys.readouterr()
    key = tmp_path / "repo" / KEY_KEY
    doc = json.loads(key.read_bytes())
    for n, r, p in [(2**30, 8, 1), (2**14, 8, 1000), ("lots", 8, 1)]:
        key.write_text(json.dumps({**doc, "n": n, "r": r, "p": p}))
        code, _, err = _run(capsys, "list", "--config", str(cfg))
        assert code == 1 and "key object" in _one_line(err) and "scrypt parameters" in err


def _forge_short_chunk(url: str, passphrase: bytes | None) -> tuple[str, int]:
    """A backup whose index names, at offset 0, a chunk of 100 bytes (its digest is right):
    what a buggy writer or, unencrypted, anyone with write access could leave."""
    from vmvault.storage.format import IndexEntry, chunk_key, encode_index

    repo = open_repository(url, passphrase=passphrase)
    m = write_full(repo, "vm", {"vda": os.urandom(2 * CHUNK)})
    short = os.urandom(100)
    digest = repo.chunk_digest(short)
    repo.backend.put(chunk_key(digest), repo.codec.seal(chunk_key(digest), short))
    entries = [IndexEntry(digest), IndexEntry(repo.chunk_names(m, "vda")[1])]
    body = encode_index(2 * CHUNK, CHUNK, entries)
    disk = m.disk("vda")
    repo.backend.put(disk.index_key, repo.codec.seal(disk.index_key, body))
    from dataclasses import replace

    forged = replace(m, disks=[replace(disk, index_digest=repo.chunk_digest(body))])
    repo.backend.put(m.key, repo.seal_manifest(forged))
    return m.backup_id, len(short)


@pytest.mark.parametrize("passphrase", [None, b"pw"])
def test_verify_read_data_catches_a_chunk_of_the_wrong_length(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], passphrase: bytes | None
) -> None:
    cfg, url = _config(tmp_path, passphrase)
    # A version 1 index can name a chunk of any length (version 2 checks it when decoding).
    init_repository(url, passphrase=passphrase, chunk_size=CHUNK, format_version=1).close()
    backup_id, size = _forge_short_chunk(url, passphrase)
    capsys.readouterr()
    code, _, _ = _run(capsys, "verify", "--config", str(cfg))
    assert code == 0  # structure is fine: the chunk exists
    code, text, _ = _run(capsys, "verify", "--read-data", "--config", str(cfg))
    assert code == 1
    assert f"problem: vm {backup_id} disk vda offset 0: chunk" in text
    assert f"has {size} bytes, expected {CHUNK}" in text


def test_empty_passphrase_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg, _ = _config(tmp_path, b"pw")
    assert main(["init", "--config", str(cfg), "--chunk-size", "64K"]) == 0
    (tmp_path / "pass").write_bytes(b"\n")
    capsys.readouterr()
    for command in ("list", "init"):
        code, _, err = _run(capsys, command, "--config", str(cfg))
        assert code == 2
        assert f"passphrase file {tmp_path / 'pass'} is empty" in _one_line(err)


def test_config_command_reports_a_missing_passphrase_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, _ = _config(tmp_path, b"pw")
    code, text, _ = _run(capsys, "config", "--config", str(cfg))
    assert code == 0 and "config OK" in text
    (tmp_path / "pass").unlink()
    for json_flag in ((), ("--json",)):
        code, out, err = _run(capsys, "config", "--config", str(cfg), *json_flag)
        assert code == 2 and "OK" not in (out if isinstance(out, str) else "")
        line = _one_line(err)
        assert "repository.passphrase_file" in line and str(tmp_path / "pass") in line
    (tmp_path / "pass").write_bytes(b"")
    code, _, err = _run(capsys, "config", "--config", str(cfg))
    assert code == 2 and "is empty" in _one_line(err)


def test_init_format_version_then_upgrade(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vmvault.storage.format import KEY_KEY
    from vmvault.storage.locks import Lease

    cfg, url = _config(tmp_path, b"pw")
    c = str(cfg)
    with pytest.raises(SystemExit) as exit_:
        main(["init", "--help"])
    out, _ = capsys.readouterr()
    assert exit_.value.code == 0 and "--format-version {1,2}" in out and "default 2" in out
    with pytest.raises(SystemExit) as exit_:
        main(["init", "--config", c, "--format-version", "3"])
    # Python 3.13's argparse quotes the value ("invalid choice: '3'"), 3.11's does not.
    assert exit_.value.code == 2
    assert re.search(r"invalid choice: '?3'?", capsys.readouterr().err)

    code, doc, _ = _run(capsys, "init", "--config", c, "--chunk-size", "64K",
                        "--format-version", "1", "--json")  # fmt: skip
    assert code == 0 and doc["version"] == 1
    data = os.urandom(3 * CHUNK)
    with open_repository(url, passphrase=b"pw") as repo:
        m = write_full(repo, "vm", {"vda": data})
        # A backup in flight: the upgrade must wait for it, and say so on one line.
        backup = Lease(repo.backend, "shared", "backup vm/in-flight", 600).acquire()
        code, _, err = _run(capsys, "upgrade", "--config", c)
        backup.release()
    assert code == 1 and "upgrade needs the repository to itself" in _one_line(err)

    code, text, _ = _run(capsys, "upgrade", "--config", c)
    assert code == 0
    assert text.splitlines() == [
        "upgrade: step 1/3: wrote key object version 3, accepting the old and the new config",
        "upgrade: step 2/3: wrote config version 2 (sub_block 65536)",
        "upgrade: step 3/3: wrote key object version 2, bound to the new config alone",
        f"{url} is now format version 2 (was 1); existing backups stay readable",
    ]
    code, doc, _ = _run(capsys, "upgrade", "--config", c, "--json")
    assert code == 0 and doc["changed"] is False and doc["steps"] == [] and doc["version"] == 2
    code, text, _ = _run(capsys, "upgrade", "--config", c)
    assert code == 0 and text == f"{url} is already format version 2: nothing changed\n"

    code, doc, _ = _run(capsys, "list", "--config", c, "--json")
    assert code == 0 and [b["backup_id"] for b in doc] == [m.backup_id]
    with open_repository(url, passphrase=b"pw") as repo:
        assert repo.config.version == 2 and read_back(repo, m, "vda") == data
        assert json.loads(repo.backend.get(KEY_KEY))["version"] == 2
    (tmp_path / "pass").write_bytes(b"wrong\n")
    code, _, err = _run(capsys, "upgrade", "--config", c)
    assert code == 1 and "wrong passphrase" in _one_line(err)


def test_upgrade_an_unencrypted_repository_on_s3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], s3_server: S3Bucket
) -> None:
    url = s3_server.repo_url("upgrade")
    c = str(_s3_config(tmp_path, url, s3_server.endpoint_url))
    code, doc, _ = _run(capsys, "init", "--config", c, "--chunk-size", "64K",
                        "--format-version", "1", "--json")  # fmt: skip
    assert code == 0 and doc["version"] == 1 and doc["encrypted"] is False
    data = os.urandom(2 * CHUNK)
    with open_repository(url, endpoint_url=s3_server.endpoint_url) as repo:
        m = write_full(repo, "vm", {"vda": data})
    code, doc, _ = _run(capsys, "upgrade", "--config", c, "--json")
    assert code == 0 and doc["steps"] == ["config-v2"] and doc["version_before"] == 1
    with open_repository(url, endpoint_url=s3_server.endpoint_url) as repo:
        assert repo.config.version == 2 and read_back(repo, m, "vda") == data
    code, doc, _ = _run(capsys, "init", "--config", str(_s3_config(tmp_path, url + "2",
                        s3_server.endpoint_url)), "--json")  # fmt: skip
    assert code == 0 and doc["version"] == 2
