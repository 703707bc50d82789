"""Damage and attack: corrupt/missing chunks, edited or truncated manifests and indexes,
wrong passphrases. Each is detected and reported with domain, backup, disk and offset."""

from __future__ import annotations

import os

import pytest

from tests.storage.conftest import CHUNK, Target
from tests.storage.helpers import image, read_back, write_full
from vmvault.storage.crypto import SCRYPT_N
from vmvault.storage.errors import CorruptObjectError, ObjectNotFoundError, PassphraseError
from vmvault.storage.format import chunk_key
from vmvault.storage.verify import verify


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x40]) + data[at + 1 :]


@pytest.mark.parametrize("passphrase", [None, b"pw"])
def test_corrupt_chunk_found_by_read_data_and_reader(
    target: Target, passphrase: bytes | None
) -> None:
    repo = target.init(passphrase)
    data = image(6 * CHUNK, 7)
    m = write_full(repo, "db1", {"vda": data})
    digest = repo.chunk_names(m, "vda")[3]
    assert digest is not None
    key = chunk_key(digest)
    b = repo.backend
    b.put(key, _flip(b.get(key), len(b.get(key)) // 2))

    structural = verify(repo)
    assert structural.ok, structural.problems  # presence is fine; bytes are not read
    deep = verify(repo, read_data=True)
    assert [(p.domain, p.backup_id, p.disk, p.offset) for p in deep.problems] == [
        ("db1", m.backup_id, "vda", 3 * CHUNK)
    ]
    assert deep.chunks_read == sum(1 for d in repo.chunk_names(m, "vda") if d)
    with pytest.raises(
        CorruptObjectError, match=f"db1 backup {m.backup_id} disk vda offset {3 * CHUNK}"
    ):
        read_back(repo, m, "vda")


def test_missing_chunk_found_by_structure_check(target: Target) -> None:
    repo = target.init()
    data = image(4 * CHUNK, 8)
    m = write_full(repo, "db1", {"vda": data})
    m2 = write_full(repo, "db2", {"vdb": data})  # same chunks, second reference
    digest = repo.chunk_names(m, "vda")[0]
    assert digest is not None
    repo.backend.delete(chunk_key(digest))
    report = verify(repo)
    where = sorted((p.domain, p.disk, p.offset) for p in report.problems)
    assert where == [("db1", "vda", 0), ("db2", "vdb", 0)]
    assert all("missing" in p.message for p in report.problems)
    one = verify(repo, m2.backup_id)
    assert [(p.backup_id, p.offset) for p in one.problems] == [(m2.backup_id, 0)]
    with pytest.raises(ObjectNotFoundError, match="offset 0"):
        read_back(repo, m, "vda")


@pytest.mark.parametrize("passphrase", [None, b"pw"])
@pytest.mark.parametrize("damage", ["truncate", "edit", "garbage"])
def test_damaged_manifest_is_detected(
    file_target: Target, passphrase: bytes | None, damage: str
) -> None:
    repo = file_target.init(passphrase)
    m = write_full(repo, "vm", {"vda": image(2 * CHUNK, 1)})
    good = write_full(repo, "vm", {"vda": image(2 * CHUNK, 2)})
    raw = repo.backend.get(m.key)
    if damage == "truncate":
        bad = raw[: len(raw) // 2]
    elif damage == "edit":
        # A plausible edit: keep the JSON valid, change the reason. Encrypted
        # manifests are ciphertext, so flip one byte of it instead.
        bad = (
            raw.replace(b"first backup", b"first backuq") if passphrase is None else _flip(raw, 40)
        )
        assert bad != raw
    else:
        bad = os.urandom(64)
    repo.backend.put(m.key, bad)
    with pytest.raises(CorruptObjectError, match=m.backup_id):
        repo.load_manifest("vm", m.backup_id)
    report = verify(repo)
    assert [(p.backup_id, p.disk) for p in report.problems] == [(m.backup_id, None)]
    assert repo.load_manifest("vm", good.backup_id).backup_id == good.backup_id


@pytest.mark.parametrize("passphrase", [None, b"pw"])
@pytest.mark.parametrize("damage", ["truncate", "edit", "missing"])
def test_damaged_index_is_detected(
    file_target: Target, passphrase: bytes | None, damage: str
) -> None:
    repo = file_target.init(passphrase)
    m = write_full(repo, "vm", {"vda": os.urandom(3 * CHUNK), "vdb": os.urandom(CHUNK)})
    key = m.disk("vda").index_key
    raw = repo.backend.get(key)
    if damage == "missing":
        repo.backend.delete(key)
    else:
        repo.backend.put(key, raw[:-10] if damage == "truncate" else _flip(raw, len(raw) - 5))
    with pytest.raises((CorruptObjectError, ObjectNotFoundError), match="vda"):
        repo.chunk_names(m, "vda")
    report = verify(repo, read_data=True)
    assert [(p.backup_id, p.disk) for p in report.problems] == [(m.backup_id, "vda")]
    assert read_back(repo, m, "vdb")  # the other disk is still readable


def test_wrong_and_missing_passphrase(target: Target) -> None:
    target.init(b"right")
    with pytest.raises(PassphraseError, match="wrong passphrase"):
        target.open(b"wrong")
    with pytest.raises(PassphraseError, match="passphrase_file"):
        target.open(None)
    assert target.open(b"right").encrypted


def test_passphrase_change_rewraps_only(file_target: Target) -> None:
    repo = file_target.init(b"old", scrypt_n=SCRYPT_N)  # the real KDF cost, once
    data = image(3 * CHUNK, 3)
    m = write_full(repo, "vm", {"vda": data})
    before = {o.key: repo.backend.get(o.key) for o in repo.backend.list("") if o.key != "key"}
    repo.change_passphrase(b"new")
    after = {o.key: repo.backend.get(o.key) for o in repo.backend.list("") if o.key != "key"}
    assert before == after  # nothing but the key object changed
    with pytest.raises(PassphraseError):
        file_target.open(b"old")
    assert read_back(file_target.open(b"new"), m, "vda") == data


def test_encrypted_objects_leak_no_plaintext_or_plain_digests(file_target: Target) -> None:
    repo = file_target.init(b"pw")
    text = (b"SECRET-CUSTOMER-RECORD " * 5000)[:CHUNK]
    m = write_full(repo, "vm", {"vda": text})
    import blake3

    plain_digest = blake3.blake3(text).hexdigest()
    keys = [o.key for o in repo.backend.list("")]
    assert not any(plain_digest in k for k in keys)  # keyed digests: names reveal nothing
    for k in keys:
        blob = repo.backend.get(k)
        assert b"SECRET-CUSTOMER" not in blob
        if k.endswith("manifest.json"):
            assert b"first backup" not in blob
    # Moving a valid chunk object to another chunk's key fails authentication.
    other = write_full(repo, "vm", {"vda": os.urandom(CHUNK)})
    a, b = repo.chunk_names(m, "vda")[0], repo.chunk_names(other, "vda")[0]
    assert a and b
    repo.backend.put(chunk_key(b), repo.backend.get(chunk_key(a)))
    with pytest.raises(CorruptObjectError, match="failed authentication"):
        read_back(repo, other, "vda")
