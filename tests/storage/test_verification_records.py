"""Verification records (section 29): written by verify, authenticated, bounded, parsed
defensively (anything odd is "unknown"), removed with their backup by prune and GC."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.storage.conftest import CHUNK, Target
from tests.storage.helpers import image, write_full
from vmvault.scheduler.cli import main
from vmvault.storage.errors import StorageError
from vmvault.storage.format import chunk_key
from vmvault.storage.gc import collect_garbage
from vmvault.storage.prune import KeepPolicy, plan_prune
from vmvault.storage.repository import open_repository
from vmvault.storage.verification import (
    MAX_PROBLEMS,
    load_records,
    new_check,
    read_record,
    record_check,
    record_key,
)
from vmvault.storage.verify import verify


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x40]) + data[at + 1 :]


@pytest.mark.parametrize("passphrase", [None, b"pw"])
def test_second_verify_records_failed_naming_disk_and_offset_and_keeps_last_ok(
    target: Target, passphrase: bytes | None
) -> None:
    repo = target.init(passphrase)
    m = write_full(repo, "db1", {"vda": image(6 * CHUNK, 7)})
    assert read_record(repo, "db1", m.backup_id) is None  # never verified
    assert verify(repo, read_data=True).ok
    first = read_record(repo, "db1", m.backup_id)
    assert first is not None and first.latest.ok and first.latest.kind == "data"
    assert first.summary().startswith("verified ")

    digest = repo.chunk_names(m, "vda")[3]
    assert digest is not None
    key = chunk_key(digest)
    repo.backend.put(key, _flip(repo.backend.get(key), len(repo.backend.get(key)) // 2))
    assert not verify(repo, read_data=True).ok

    second = read_record(repo, "db1", m.backup_id)
    assert second is not None and not second.latest.ok
    assert second.last_ok == first.latest  # the last good check survives a failure
    assert f"at vda offset {3 * CHUNK}" in second.summary()
    assert second.summary().startswith("FAILED ")
    assert load_records(repo) == {("db1", m.backup_id): second}


def test_structure_verify_of_one_backup_records_only_that_backup(file_target: Target) -> None:
    repo = file_target.init()
    a = write_full(repo, "a", {"vda": image(2 * CHUNK, 1)})
    b = write_full(repo, "b", {"vda": image(2 * CHUNK, 2)})
    verify(repo, b.backup_id)
    assert read_record(repo, "a", a.backup_id) is None
    rec = read_record(repo, "b", b.backup_id)
    assert rec is not None and rec.latest.kind == "structure" and rec.latest.ok
    assert set(load_records(repo)) == {("b", b.backup_id)}


def test_problems_are_capped_and_counted(file_target: Target) -> None:
    repo = file_target.init()
    m = write_full(repo, "a", {"vda": image(2 * CHUNK, 1)})
    check = new_check("data", [f"problem {i} " + "x" * 1000 for i in range(50)])
    record_check(repo, "a", m.backup_id, check)
    rec = read_record(repo, "a", m.backup_id)
    assert rec is not None
    assert len(rec.latest.problems) == MAX_PROBLEMS and rec.latest.problem_count == 50
    assert len(repo.backend.get(record_key("a", m.backup_id))) < 8 * 1024


FORGERIES = ["flip", "edit-ok", "huge", "nested", "garbage", "moved", "no-checksum"]


@pytest.mark.parametrize("passphrase", [None, b"pw"])
@pytest.mark.parametrize("how", FORGERIES)
def test_forged_or_damaged_record_is_unknown_not_verified(
    file_target: Target, passphrase: bytes | None, how: str
) -> None:
    repo = file_target.init(passphrase)
    m = write_full(repo, "a", {"vda": image(2 * CHUNK, 1)})
    other = write_full(repo, "b", {"vda": image(2 * CHUNK, 2)})
    record_check(repo, "a", m.backup_id, new_check("data", ["chunk x is missing at vda"]))
    record_check(repo, "b", other.backup_id, new_check("data", []))
    key = record_key("a", m.backup_id)
    raw = repo.backend.get(key)
    if how == "flip":
        bad = _flip(raw, len(raw) // 2)
    elif how == "edit-ok":
        if passphrase:
            pytest.skip("ciphertext: 'flip' covers edits")
        doc = json.loads(raw)
        doc["latest"].update(ok=True, problems=[], problem_count=0)
        bad = json.dumps(doc).encode()  # the stale checksum gives it away
    elif how == "huge":
        bad = b'{"a": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    elif how == "nested":
        bad = b"[" * 100_000 + b"]" * 100_000
    elif how == "garbage":
        bad = b"\xff\x00not json"
    elif how == "moved":
        bad = repo.backend.get(record_key("b", other.backup_id))  # b's "ok" copied onto a
    else:
        doc = {"version": 1, "domain": "a", "backup_id": m.backup_id, "latest": {}}
        bad = json.dumps(doc).encode()
    repo.backend.put(key, bad)
    assert read_record(repo, "a", m.backup_id) is None
    assert ("a", m.backup_id) not in load_records(repo)


def test_prune_and_gc_remove_the_record_with_its_backup(file_target: Target) -> None:
    repo = file_target.init()
    old = write_full(repo, "a", {"vda": image(2 * CHUNK, 1)})
    new = write_full(repo, "a", {"vda": image(2 * CHUNK, 2)})
    verify(repo)
    plan = plan_prune(KeepPolicy(last=1), repo.list_manifests())
    plan.execute(repo, None)
    assert not repo.backend.exists(record_key("a", old.backup_id))
    assert read_record(repo, "a", new.backup_id) is not None

    # A record whose backup is gone (written by a verify that raced a prune) is litter.
    record_check(repo, "a", old.backup_id, new_check("structure", []))
    report = collect_garbage(repo, grace=0)
    assert report.orphan_objects_deleted == 1
    assert not repo.backend.exists(record_key("a", old.backup_id))
    assert read_record(repo, "a", new.backup_id) is not None


def test_cli_list_and_show_print_verified_failed_and_unverified(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.storage.test_cli import _config, _run

    cfg, url = _config(tmp_path, b"pw")
    c = str(cfg)
    assert main(["init", "--config", c, "--chunk-size", "64K"]) == 0
    repo = open_repository(url, passphrase=b"pw")
    good = write_full(repo, "web1", {"vda": image(4 * CHUNK, 1)})
    bad = write_full(repo, "db1", {"vda": image(4 * CHUNK, 2)})
    write_full(repo, "app1", {"vda": image(CHUNK, 3, zero_every=2)})
    capsys.readouterr()
    assert _run(capsys, "verify", good.backup_id, "--read-data", "--config", c)[0] == 0
    digest = repo.chunk_names(bad, "vda")[1]
    assert digest is not None
    repo.backend.delete(chunk_key(digest))
    assert _run(capsys, "verify", bad.backup_id, "--config", c)[0] == 1

    code, doc, _ = _run(capsys, "list", "--config", c, "--json")
    status = {b["domain"]: b["verification"] for b in doc}
    assert status["web1"]["status"] == "verified" and status["web1"]["latest"]["kind"] == "data"
    assert status["db1"]["status"] == "failed"
    assert f"at vda offset {CHUNK}" in status["db1"]["latest"]["problems"][0]
    assert status["app1"] == {"status": "unverified"}
    code, text, err = _run(capsys, "list", "--config", c)
    lines = {ln.split()[1]: ln for ln in (text + err).splitlines() if ln[:1].isdigit()}
    assert re.search(r"verified \d{4}-\d\d-\d\d \(data\)$", lines["web1"])
    assert "FAILED" in lines["db1"] and f"missing at vda offset {CHUNK}" in lines["db1"]
    assert lines["app1"].endswith("unverified")

    code, doc, _ = _run(capsys, "show", bad.backup_id, "--config", c, "--json")
    assert code == 0 and doc["verification"]["status"] == "failed"
    code, text, err = _run(capsys, "show", bad.backup_id, "--config", c)
    assert "verification FAILED" in text + err
    repo.close()


def test_verify_of_a_repository_it_cannot_write_reports_and_warns(
    file_target: Target, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    repo = file_target.init()
    m = write_full(repo, "a", {"vda": image(2 * CHUNK, 1)})
    backend = type(repo.backend)
    real_put = backend.put

    def refuse_records(self: Any, key: str, data: Any, **kw: Any) -> bool:
        if key.endswith("/verification.json"):
            raise StorageError(f"cannot write {key!r}: Permission denied")
        return real_put(self, key, data, **kw)

    monkeypatch.setattr(backend, "put", refuse_records)
    report = verify(repo, read_data=True)
    assert report.ok and report.backups == 1
    assert read_record(repo, "a", m.backup_id) is None
    assert any("could not record 1 verification(s)" in r.getMessage() for r in caplog.records)
