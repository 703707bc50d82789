"""Encryption cannot be switched off through ``config``: a passphrase never meets an
unencrypted repository, and in an encrypted one the key object binds the config's bytes."""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from tests.storage.conftest import CHUNK, FAST_SCRYPT, Target
from tests.storage.helpers import read_back, write_full
from vmvault.storage.crypto import Codec
from vmvault.storage.errors import ConfigMismatchError, PassphraseError
from vmvault.storage.format import (
    CONFIG_KEY,
    KEY_KEY,
    IndexEntry,
    Manifest,
    canonical_json,
    chunk_key,
    encode_index,
    index_key,
)
from vmvault.storage.repository import Repository, open_repository


def _edit_config(target: Target, edit: str) -> None:
    b = target.backend()
    raw = b.get(CONFIG_KEY)
    doc = json.loads(raw)
    if edit == "encryption":
        doc["encryption"] = "none"
    elif edit == "chunk_size":
        doc["chunk_size"] = doc["chunk_size"] * 2
    elif edit == "created":
        doc["created"] = "2020-01-01T00:00:00.000000Z"
    new = raw + b"\n" if edit == "whitespace" else json.dumps(doc, indent=2).encode() + b"\n"
    assert new != raw
    b.put(CONFIG_KEY, new)


def test_a_passphrase_never_meets_an_unencrypted_repository(target: Target) -> None:
    """Made without encryption, opened with a passphrase configured: refused, not ignored."""
    target.init()
    with pytest.raises(ConfigMismatchError, match=r"not encrypted.*passphrase_file"):
        target.open(b"pw")
    assert not target.open().encrypted


def test_switching_encryption_off_in_config_is_refused(target: Target) -> None:
    repo = target.init(b"pw")
    m = write_full(repo, "vm", {"vda": os.urandom(2 * CHUNK)})
    original = target.backend().get(CONFIG_KEY)
    _edit_config(target, "encryption")
    before = {o.key for o in target.backend().list("")}
    with pytest.raises(ConfigMismatchError, match=r"not encrypted.*passphrase_file"):
        target.open(b"pw")
    # Without the passphrase too: a key object next to an "unencrypted" config is a
    # contradiction, not a repository to write plaintext into.
    with pytest.raises(ConfigMismatchError, match="'key' object"):
        target.open()
    assert {o.key for o in target.backend().list("")} == before
    # Putting the original config back is all it takes to repair it.
    target.backend().put(CONFIG_KEY, original)
    assert read_back(target.open(b"pw"), m, "vda")


def test_a_forged_plaintext_backup_does_not_restore(target: Target) -> None:
    """The attack of issue 9: config says "none", a plaintext backup is planted."""
    repo = target.init(b"pw")
    write_full(repo, "vm", {"vda": os.urandom(CHUNK)})
    _edit_config(target, "encryption")
    b = target.backend()
    plain = Codec(None)
    evil = b"\xcc" * CHUNK
    digest = plain.digest(evil)
    b.put(chunk_key(digest), plain.seal(chunk_key(digest), evil))
    forged_id = "20990101T000000.000000Z-0badc0de"
    ikey = index_key("vm", forged_id, "vda")
    body = encode_index(CHUNK, CHUNK, [IndexEntry(digest)])
    b.put(ikey, plain.seal(ikey, body))
    m = Manifest.from_json(
        {
            "version": 1,
            "backup_id": forged_id,
            "domain": "vm",
            "parent": None,
            "kind": "full",
            "reason": "forged",
            "checkpoint": None,
            "created": "2099-01-01T00:00:00Z",
            "finished": "2099-01-01T00:00:00Z",
            "chunk_size": CHUNK,
            "disks": [
                {
                    "name": "vda",
                    "virtual_size": CHUNK,
                    "format": "raw",
                    "index": ikey,
                    "index_digest": plain.digest(body),
                    "chunks": 1,
                }
            ],
        },
        "forged",
    )
    doc = m.to_json()
    doc["checksum"] = plain.digest(canonical_json(doc))
    b.put(m.key, json.dumps(doc).encode())
    for passphrase in (b"pw", None):
        with pytest.raises(ConfigMismatchError):
            target.open(passphrase)


@pytest.mark.parametrize("edit", ["chunk_size", "created", "whitespace"])
def test_any_config_edit_is_detected_in_an_encrypted_repository(target: Target, edit: str) -> None:
    repo = target.init(b"pw")
    write_full(repo, "vm", {"vda": os.urandom(CHUNK)})
    _edit_config(target, edit)
    with pytest.raises(ConfigMismatchError, match=r"config.*(altered|changed)"):
        target.open(b"pw")
    with pytest.raises(PassphraseError, match="wrong passphrase"):
        target.open(b"not it")  # a wrong passphrase is still reported as such


def _legacy_key_object(passphrase: bytes, repo_id: str, master: bytes) -> bytes:
    """A version 1 key object, as vmvault wrote it before the config binding."""
    salt, nonce = secrets.token_bytes(16), secrets.token_bytes(12)
    kek = Scrypt(salt=salt, length=32, n=FAST_SCRYPT, r=8, p=1).derive(passphrase)
    wrapped = AESGCM(kek).encrypt(nonce, master, f"vmvault key {repo_id}".encode())
    doc = {
        "version": 1,
        "kdf": "scrypt",
        "n": FAST_SCRYPT,
        "r": 8,
        "p": 1,
        "salt": base64.b64encode(salt).decode(),
        "cipher": "aes-256-gcm",
        "nonce": base64.b64encode(nonce).decode(),
        "wrapped_key": base64.b64encode(wrapped).decode(),
    }
    return json.dumps(doc, indent=2).encode() + b"\n"


def _master(repo: Repository) -> bytes:
    keys = repo.codec.keys
    assert keys is not None
    return keys.encryption + keys.hashing


def test_a_repository_from_before_the_binding_opens_and_passwd_binds_it(
    target: Target, caplog: pytest.LogCaptureFixture
) -> None:
    repo = target.init(b"pw")
    data = os.urandom(2 * CHUNK)
    m = write_full(repo, "vm", {"vda": data})
    b = target.backend()
    b.put(KEY_KEY, _legacy_key_object(b"pw", repo.config.id, _master(repo)))
    assert json.loads(b.get(KEY_KEY))["version"] == 1

    caplog.set_level(logging.WARNING)
    old = target.open(b"pw")
    assert read_back(old, m, "vda") == data
    assert any("vmvault passwd" in r.getMessage() for r in caplog.records)

    # Re-wrapping (here under the same passphrase) binds the config.
    old.change_passphrase(b"pw")
    assert json.loads(b.get(KEY_KEY))["version"] == 2
    caplog.clear()
    bound = target.open(b"pw")
    assert read_back(bound, m, "vda") == data
    assert not any("vmvault passwd" in r.getMessage() for r in caplog.records)
    _edit_config(target, "whitespace")
    with pytest.raises(ConfigMismatchError):
        target.open(b"pw")


def test_an_old_vmvault_is_told_to_upgrade_not_that_the_passphrase_is_wrong(
    file_target: Target,
) -> None:
    """The bound key object is version 2: a version-1 reader refuses it by version."""
    file_target.init(b"pw")
    doc = json.loads(file_target.backend().get(KEY_KEY))
    assert doc["version"] == 2
    assert set(doc) == {"version", "kdf", "n", "r", "p", "salt", "cipher", "nonce", "wrapped_key"}
    assert open_repository(file_target.url, passphrase=b"pw").encrypted
