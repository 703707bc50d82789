"""One damaged manifest is reported and skipped: list, backup planning, restore of the
intact backups, prune and verify keep working; GC never loses what it might reference."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from tests.storage.conftest import CHUNK, Target
from tests.storage.helpers import image, read_back, write_full
from vmvault.scheduler.cli import main
from vmvault.storage.errors import CorruptObjectError
from vmvault.storage.format import Manifest, chunk_key
from vmvault.storage.gc import GcAbortedError, collect_garbage
from vmvault.storage.prune import KeepPolicy, plan_prune
from vmvault.storage.repository import Repository
from vmvault.storage.verify import verify
from vmvault.worker.restore import select_backup

DAMAGES = ["truncate", "edit", "json", "garbage"]


def _damage(repo: Repository, m: Manifest, how: str) -> None:
    raw = repo.backend.get(m.key)
    if how == "truncate":
        bad = raw[: len(raw) // 2]
    elif how == "edit":
        # Valid JSON with one field changed (plain); one flipped byte (ciphertext).
        bad = (
            raw.replace(b'"kind": "full"', b'"kind": "incremental"')
            if not repo.encrypted
            else raw[:40] + bytes([raw[40] ^ 1]) + raw[41:]
        )
        assert bad != raw
    elif how == "json":
        bad = b'{"version": 1, "backup_id": '
    else:
        bad = os.urandom(200)
    repo.backend.put(m.key, bad)


def _warned(caplog: pytest.LogCaptureFixture, key: str) -> bool:
    return any(r.levelno == logging.WARNING and key in r.getMessage() for r in caplog.records)


def _three(repo: Repository) -> list[Manifest]:
    return [write_full(repo, "vm", {"vda": image(3 * CHUNK, seed)}) for seed in (1, 2, 3)]


@pytest.mark.parametrize("passphrase", [None, b"pw"])
@pytest.mark.parametrize("how", DAMAGES)
def test_list_latest_and_restore_skip_a_damaged_manifest(
    file_target: Target, passphrase: bytes | None, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    repo = file_target.init(passphrase)
    m1, m2, m3 = _three(repo)
    _damage(repo, m3, how)  # the newest: what backup planning would have used
    caplog.set_level(logging.WARNING)
    assert [m.backup_id for m in repo.list_manifests("vm")] == [m1.backup_id, m2.backup_id]
    assert _warned(caplog, m3.key)
    latest = repo.latest_manifest("vm")
    assert latest is not None and latest.backup_id == m2.backup_id
    scan = repo.scan_manifests()
    assert [d.key for d in scan.damaged] == [m3.key]
    assert (scan.damaged[0].domain, scan.damaged[0].backup_id) == ("vm", m3.backup_id)
    # Restores of the intact backups still find them.
    assert select_backup(repo, "vm", m1.backup_id).backup_id == m1.backup_id
    assert read_back(repo, m1, "vda") == image(3 * CHUNK, 1)
    # Asking for the damaged one by id says what is wrong with it.
    with pytest.raises(CorruptObjectError, match=m3.backup_id):
        repo.find_backup(m3.backup_id)
    # A new backup can still be planned and taken on top of the newest intact one.
    w = repo.open_backup("vm", latest, "incremental", "test: after damage", None)
    d = w.open_disk("vda", 3 * CHUNK, "raw")
    d.keep_parent(0, 3 * CHUNK)
    d.finish()
    m4 = w.commit()
    assert [m.backup_id for m in repo.list_manifests("vm")][-1] == m4.backup_id


def test_verify_names_the_damaged_manifest_and_checks_the_rest(file_target: Target) -> None:
    repo = file_target.init()
    _, m2, _ = _three(repo)
    _damage(repo, m2, "json")
    report = verify(repo, read_data=True)
    assert [(p.backup_id, p.disk) for p in report.problems] == [(m2.backup_id, None)]
    assert m2.key in report.problems[0].message
    assert report.chunks_read > 0


def test_prune_neither_keeps_nor_removes_a_damaged_manifest(file_target: Target) -> None:
    repo = file_target.init()
    m1, m2, m3 = _three(repo)
    _damage(repo, m3, "truncate")
    scan = repo.scan_manifests("vm")
    plan = plan_prune(KeepPolicy(last=1), scan.manifests, scan.damaged)
    assert [d.manifest.backup_id for d in plan.keep] == [m2.backup_id]
    assert [d.manifest.backup_id for d in plan.remove] == [m1.backup_id]
    assert [d.key for d in plan.damaged] == [m3.key]
    doc = plan.to_json()
    assert doc["keep"] == 1 and doc["remove"] == 1
    assert [d["backup_id"] for d in doc["damaged"]] == [m3.backup_id]
    assert plan.execute(repo) == [m1.backup_id]
    assert repo.backend.exists(m3.key)  # left in place for the operator to look at
    assert [m.backup_id for m in repo.list_manifests()] == [m2.backup_id]


@pytest.mark.parametrize("passphrase", [None, b"pw"])
def test_gc_marks_through_the_indexes_of_a_damaged_backup(
    target: Target, passphrase: bytes | None, caplog: pytest.LogCaptureFixture
) -> None:
    """Its manifest is unreadable, but a repair could still restore it: keep its chunks."""
    repo = target.init(passphrase)
    m1 = write_full(repo, "vm", {"vda": os.urandom(2 * CHUNK)})
    m2 = write_full(repo, "vm", {"vda": os.urandom(2 * CHUNK), "vdb": os.urandom(CHUNK)})
    needed = {
        chunk_key(d) for disk in ("vda", "vdb") for d in repo.chunk_names(m2, disk) if d is not None
    }
    _damage(repo, m2, "garbage")
    caplog.set_level(logging.WARNING)
    report = collect_garbage(repo, grace=0)
    assert report.chunks_deleted == 0 and report.damaged_backups == 1
    assert _warned(caplog, m2.key)
    assert needed <= {o.key for o in repo.backend.list("chunks/")}
    assert repo.backend.exists(m2.key) and repo.backend.exists(m2.disk("vda").index_key)
    assert read_back(repo, m1, "vda")


def test_gc_refuses_to_sweep_when_a_damaged_backup_index_is_unreadable(
    file_target: Target,
) -> None:
    repo = file_target.init()
    write_full(repo, "vm", {"vda": os.urandom(CHUNK)})
    m2 = write_full(repo, "vm", {"vda": os.urandom(2 * CHUNK)})
    garbage = repo.open_backup("junk", None, "full", "test: aborted", None)
    garbage.open_disk("vda", CHUNK, "raw").put_chunk(0, os.urandom(CHUNK))
    garbage.abort()
    before = {o.key for o in repo.backend.list("chunks/")}
    _damage(repo, m2, "json")
    index = m2.disk("vda").index_key
    repo.backend.put(index, b"\x01not zstd")
    with pytest.raises(GcAbortedError, match=f"nothing deleted.*{m2.backup_id}.*{index}"):
        collect_garbage(repo, grace=0)
    assert {o.key for o in repo.backend.list("chunks/")} == before


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, (json.loads(out) if "--json" in argv and out else out), err


def test_cli_list_prune_verify_show_the_damaged_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"file://{tmp_path}/repo"
    cfg = tmp_path / "vmvault.yaml"
    cfg.write_text(f"repository:\n  url: {url}\n")
    c = str(cfg)
    assert main(["init", "--config", c, "--chunk-size", "64K"]) == 0
    from vmvault.storage.repository import open_repository

    repo = open_repository(url)
    m1, m2, m3 = _three(repo)
    _damage(repo, m2, "edit")
    capsys.readouterr()

    code, doc, _ = _cli(capsys, "list", "--config", c, "--json")
    assert code == 0
    assert [(b["backup_id"], b["damaged"]) for b in doc] == [
        (m1.backup_id, False),
        (m3.backup_id, False),
        (m2.backup_id, True),
    ]
    assert m2.key in doc[2]["error"] and doc[2]["domain"] == "vm" and doc[2]["kind"] is None
    code, text, _ = _cli(capsys, "list", "--config", c)
    assert code == 0 and f"damaged manifest {m2.key}" in text

    code, doc, _ = _cli(capsys, "prune", "--keep-last", "1", "--dry-run", "--config", c, "--json")
    assert code == 0 and doc["keep"] == 1 and doc["remove"] == 1
    assert [d["backup_id"] for d in doc["damaged"]] == [m2.backup_id]
    code, text, _ = _cli(capsys, "prune", "--keep-last", "1", "--config", c)
    assert code == 0 and f"damaged {m2.key}" in text
    assert repo.backend.exists(m2.key)

    code, text, _ = _cli(capsys, "verify", "--config", c)
    assert code == 1 and f"problem: vm {m2.backup_id}: manifest" in text and m2.key in text
