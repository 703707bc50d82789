"""``vmvault copy`` and ``--repository NAME`` through ``main``: file:// primary, S3 off-site."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.s3 import S3Bucket
from tests.storage.conftest import CHUNK, FAST_SCRYPT
from tests.storage.helpers import read_back, write_full
from vmvault.scheduler.cli import main
from vmvault.storage.repository import init_repository, open_repository


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, (json.loads(out) if "--json" in argv and out else out), err


def test_copy_to_offsite_and_repository_flag(
    tmp_path: Path, s3_server: S3Bucket, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "offsite.pass").write_bytes(b"off-site secret\n")
    primary = f"file://{tmp_path}/repo"
    offsite = s3_server.repo_url("offsite")
    cfg = tmp_path / "vmvault.yaml"
    cfg.write_text(
        f"repository:\n  url: {primary}\n"
        "domains:\n  web1: {host: hv1, qmp: /run/vmvault/web1.qmp}\n"
        "repositories:\n"
        f"  offsite:\n    url: {offsite}\n    endpoint_url: {s3_server.endpoint_url}\n"
        f"    passphrase_file: {tmp_path / 'offsite.pass'}\n"
        "    retention: {keep_last: 1}\n"
    )
    c = str(cfg)
    init_repository(primary, chunk_size=CHUNK).close()
    code, doc, _ = _run(
        capsys, "init", "--repository", "offsite", "--chunk-size", "64K", "--config", c, "--json"
    )
    assert code == 0 and doc["encrypted"] is True and doc["url"] == offsite

    disks = [os.urandom(3 * CHUNK) for _ in range(2)]
    with open_repository(primary) as repo:
        made = [write_full(repo, "web1", {"vda": d}) for d in disks]

    code, doc, _ = _run(capsys, "copy", "--to", "offsite", "--config", c, "--json")
    assert code == 0, doc
    assert doc["mode"] == "rebuild" and len(doc["copied"]) == 2 and doc["regions_verified"] == 6
    code, text, _ = _run(capsys, "copy", "--to", "offsite", "--config", c)
    assert code == 0 and "0 backups copied, 2 already there; 0 objects" in text

    code, doc, _ = _run(capsys, "list", "--repository", "offsite", "--config", c, "--json")
    assert [b["backup_id"] for b in doc] == [m.backup_id for m in made]
    with open_repository(
        offsite, endpoint_url=s3_server.endpoint_url, passphrase=b"off-site secret"
    ) as dst:
        for m, data in zip(dst.list_manifests(), disks, strict=True):
            assert read_back(dst, m, "vda") == data

    # prune --repository uses that repository's retention; the primary is untouched.
    code, doc, _ = _run(capsys, "prune", "--repository", "offsite", "--config", c, "--json")
    assert code == 0 and doc["removed"] == [made[0].backup_id]
    code, doc, _ = _run(capsys, "list", "--config", c, "--json")
    assert len(doc) == 2
    code, _, err = _run(capsys, "prune", "--config", c)
    assert code == 2 and "--keep" in err

    code, doc, _ = _run(
        capsys, "verify", "--repository", "offsite", "--read-data", "--config", c, "--json"
    )
    assert code == 0 and doc["ok"] and doc["backups"] == 1

    # Restore from the copy (qcow2 files, read back and verified): the newest kept one.
    out = tmp_path / "restored"
    code, doc, err = _run(
        capsys, "restore", "web1", "--repository", "offsite", "--to", str(out), "--config", c,
        "--json",
    )  # fmt: skip
    assert code == 0, err
    assert doc["backup_id"] == made[1].backup_id and doc["disks"][0]["verified"] is True
    raw = tmp_path / "restored.raw"
    subprocess.run(
        ["qemu-img", "convert", "-O", "raw", doc["disks"][0]["path"], str(raw)], check=True
    )
    assert raw.read_bytes() == disks[1]
    code, _, err = _run(
        capsys, "restore", "web1", "--repository", "offsite", "--live", "--config", c
    )
    assert code == 2 and "--live restores from the primary repository only" in err

    code, text, _ = _run(capsys, "config", "--config", c)
    assert code == 0 and f"offsite              {offsite} (encrypted)" in text
    (tmp_path / "offsite.pass").write_bytes(b"")
    code, _, err = _run(capsys, "config", "--config", c)
    assert code == 2 and "repositories.offsite.passphrase_file: passphrase file" in err
    (tmp_path / "offsite.pass").write_bytes(b"off-site secret\n")

    # Unknown names: a one-line error, exit 2, nothing touched.
    code, _, err = _run(capsys, "list", "--repository", "nope", "--config", c)
    assert code == 2 and "'nope' is not in the config's repositories (offsite)" in err
    code, _, err = _run(capsys, "copy", "--to", "nope", "--config", c)
    assert code == 2 and "'nope'" in err

    # And back, the off-site repository as the source of a copy into another one.
    back = f"file://{tmp_path}/back"
    init_repository(back, chunk_size=CHUNK, scrypt_n=FAST_SCRYPT).close()
    cfg.write_text(cfg.read_text() + f"  back:\n    url: {back}\n")
    code, doc, _ = _run(
        capsys, "copy", "--from", "offsite", "--to", "back", "--config", c, "--json"
    )
    assert code == 0 and doc["copied"] == [f"web1/{made[1].backup_id}"]
    with open_repository(back) as repo:
        (m,) = repo.list_manifests()
        assert read_back(repo, m, "vda") == disks[1]
