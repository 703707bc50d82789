"""``vmvault upgrade`` (storage/upgrade.py) and the version 3 key object it bridges with.

Section 27 of docs/repository-format.md: a version 1 repository becomes version 2 by
rewriting ``config`` and ``key`` only, crash-safe at every step, and its old backups stay
readable.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from tests.storage.conftest import CHUNK, FAST_SCRYPT, Target
from tests.storage.helpers import image, read_back, write_full
from tests.storage.test_config_binding import _legacy_key_object, _master
from vmvault.storage.crypto import (
    MASTER_KEY_SIZE,
    config_digest,
    new_multi_config_key_object,
    unwrap_key_object,
)
from vmvault.storage.errors import (
    ConfigMismatchError,
    CorruptObjectError,
    PassphraseError,
    RepositoryLockedError,
    StorageError,
    UnsupportedVersionError,
)
from vmvault.storage.format import (
    CONFIG_KEY,
    KEY_KEY,
    LOCKS_PREFIX,
    SUB_BLOCK_SIZE,
    Manifest,
    RepoConfig,
)
from vmvault.storage.locks import Lease
from vmvault.storage.repository import Repository
from vmvault.storage.upgrade import Step, plan_upgrade, upgrade_repository, upgraded_config

PW = b"correct horse"


class _Crash(Exception):
    """Stands for the process dying in the middle of a write sequence."""


def _v1_repository(target: Target, passphrase: bytes | None) -> tuple[Manifest, bytes]:
    """A version 1 repository holding one backup (v1 index and manifest) of a small disk."""
    repo = target.init(passphrase, format_version=1)
    assert repo.config.version == 1
    data = image(5 * CHUNK + 4096, seed=7)
    m = write_full(repo, "web1", {"vda": data})
    repo.close()
    return m, data


def _objects(target: Target) -> dict[str, bytes]:
    """Every object of the repository except locks: key -> bytes."""
    b = target.backend()
    try:
        return {o.key: b.get(o.key) for o in b.list("") if not o.key.startswith(LOCKS_PREFIX)}
    finally:
        b.close()


def _key_doc(target: Target) -> dict[str, object]:
    doc: dict[str, object] = json.loads(target.backend().get(KEY_KEY))
    return doc


def _upgrade(target: Target, passphrase: bytes | None) -> list[Step]:
    with target.open(passphrase) as repo:
        return upgrade_repository(repo, passphrase).steps


def _check_upgraded(target: Target, passphrase: bytes | None, m: Manifest, data: bytes) -> None:
    """The finished state: config version 2, the key bound to it alone, the backup readable."""
    with target.open(passphrase) as repo:
        assert repo.config.version == 2
        assert [x.backup_id for x in repo.list_manifests("web1")] == [m.backup_id]
        assert read_back(repo, repo.find_backup(m.backup_id), "vda") == data
    if passphrase is not None:
        assert _key_doc(target)["version"] == 2


def test_init_makes_version_2_by_default_and_1_when_asked(target: Target) -> None:
    repo = target.init(b"pw")
    doc = json.loads(target.backend().get(CONFIG_KEY))
    assert doc["version"] == 2 and doc["sub_block"] == SUB_BLOCK_SIZE
    assert repo.config.version == 2 and target.open(b"pw").config.version == 2

    other = Target(target.kind, target.url + "-v1", target.endpoint_url)
    assert other.init(format_version=1).config.version == 1
    doc = json.loads(other.backend().get(CONFIG_KEY))
    assert doc["version"] == 1 and "sub_block" not in doc

    third = Target(target.kind, target.url + "-v3", target.endpoint_url)
    for bad in (3, 0, True):
        with pytest.raises(StorageError, match=rf"format version {bad} .*use 1 or 2"):
            third.init(format_version=bad)
    assert list(third.backend().list("")) == []


@pytest.mark.parametrize("encrypted", [True, False], ids=["encrypted", "plain"])
def test_upgrade_keeps_every_backup_and_touches_only_config_and_key(
    target: Target, encrypted: bool
) -> None:
    passphrase = PW if encrypted else None
    m, data = _v1_repository(target, passphrase)
    before = _objects(target)
    old_config = RepoConfig.from_bytes(before[CONFIG_KEY], target.url)

    seen: list[tuple[str, int, int]] = []
    with target.open(passphrase) as repo:
        report = upgrade_repository(repo, passphrase, lambda *p: seen.append(p))
    if encrypted:
        assert report.steps == [Step.BIND_BOTH, Step.CONFIG, Step.BIND_NEW]
    else:
        assert report.steps == [Step.CONFIG]
    n = len(report.steps)
    assert seen == [("upgrade", i, n) for i in range(n + 1)]
    assert (report.version_before, report.version, report.changed) == (1, 2, True)

    after = _objects(target)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert changed == ({CONFIG_KEY, KEY_KEY} if encrypted else {CONFIG_KEY})
    new_config = RepoConfig.from_bytes(after[CONFIG_KEY], target.url)
    # Every member but version (and the new sub_block) as it was, byte for byte as init
    # of version 2 would have written it.
    assert (
        after[CONFIG_KEY]
        == RepoConfig(
            old_config.id,
            old_config.chunk_size,
            old_config.encrypted,
            old_config.created,
            version=2,
        ).to_bytes()
    )
    assert (new_config.id, new_config.created, new_config.encrypted) == (
        old_config.id,
        old_config.created,
        encrypted,
    )
    assert json.loads(after[CONFIG_KEY])["sub_block"] == SUB_BLOCK_SIZE
    if encrypted:
        # The same master key, under the same scrypt cost, now bound to the new config.
        assert _key_doc(target)["n"] == FAST_SCRYPT
    _check_upgraded(target, passphrase, m, data)
    assert list(target.backend().list(LOCKS_PREFIX)) == []

    # A second run finds nothing to do and writes nothing.
    with target.open(passphrase) as repo:
        again = upgrade_repository(repo, passphrase)
    assert again.steps == [] and not again.changed and again.version == 2
    assert _objects(target) == after


def test_a_fresh_version_2_repository_is_left_alone(file_target: Target) -> None:
    file_target.init(PW)
    before = _objects(file_target)
    assert _upgrade(file_target, PW) == []
    assert _objects(file_target) == before


def _crash_on_write(monkeypatch: pytest.MonkeyPatch, repo: Repository, n: int) -> list[str]:
    """Make the ``n``-th write of ``config`` or ``key`` through ``repo`` fail as a crash
    would: that object is not written, the ones before it are. Returns the keys tried."""
    real_put = repo.backend.put
    writes: list[str] = []

    def put(key: str, *args: object, **kw: object) -> bool:
        if not key.startswith(LOCKS_PREFIX):
            writes.append(key)
            if len(writes) == n:
                raise _Crash(key)
        return real_put(key, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(repo.backend, "put", put)
    return writes


@pytest.mark.parametrize("crash_before", [1, 2, 3])
def test_a_crash_at_any_step_leaves_a_usable_repository_and_a_rerun_finishes(
    file_target: Target, monkeypatch: pytest.MonkeyPatch, crash_before: int
) -> None:
    """The process dies as it writes step ``crash_before``; the steps before it landed."""
    m, data = _v1_repository(file_target, PW)
    old_config = _objects(file_target)[CONFIG_KEY]
    new_config = upgraded_config(old_config, file_target.url)

    with file_target.open(PW) as repo:
        writes = _crash_on_write(monkeypatch, repo, crash_before)
        with pytest.raises(_Crash):
            upgrade_repository(repo, PW)
    assert writes == [KEY_KEY, CONFIG_KEY, KEY_KEY][:crash_before]

    # The state left opens with the passphrase (and only with it), backups readable.
    stored = _objects(file_target)
    expect_config = new_config if crash_before == 3 else old_config
    assert stored[CONFIG_KEY] == expect_config
    key_version = _key_doc(file_target)["version"]
    assert key_version == (2 if crash_before == 1 else 3)
    with file_target.open(PW) as mid:
        assert mid.config.version == (2 if crash_before == 3 else 1)
        assert read_back(mid, m, "vda") == data
        if key_version == 3:
            key = unwrap_key_object(stored[KEY_KEY], PW, mid.config.id, expect_config)
            assert key.digests == (config_digest(old_config), config_digest(new_config))
    with pytest.raises(PassphraseError, match="wrong passphrase"):
        file_target.open(b"not it")

    # Running it again does the steps that were left, and nothing twice.
    left = [Step.BIND_BOTH, Step.CONFIG, Step.BIND_NEW][crash_before - 1 :]
    assert _upgrade(file_target, PW) == left
    _check_upgraded(file_target, PW, m, data)
    assert _upgrade(file_target, PW) == []


def test_a_crash_before_the_last_key_then_a_rerun(
    target: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above on both backends: the new config landed, the final key did not."""
    m, data = _v1_repository(target, PW)
    with target.open(PW) as repo:
        _crash_on_write(monkeypatch, repo, 3)
        with pytest.raises(_Crash):
            upgrade_repository(repo, PW)
    assert _key_doc(target)["version"] == 3
    with target.open(PW) as mid:
        assert mid.config.version == 2 and read_back(mid, m, "vda") == data
    assert _upgrade(target, PW) == [Step.BIND_NEW]
    _check_upgraded(target, PW, m, data)


_KILLED_UPGRADE = """
import os, sys
from vmvault.storage.repository import open_repository
from vmvault.storage.upgrade import upgrade_repository

url, n, passphrase = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
repo = open_repository(url, passphrase=passphrase)
real_put, writes = repo.backend.put, []

def put(key, *args, **kw):
    if not key.startswith("locks/"):
        writes.append(key)
        if len(writes) == n:
            os._exit(9)  # killed: no teardown, the exclusive lock stays behind
    return real_put(key, *args, **kw)

repo.backend.put = put
upgrade_repository(repo, passphrase)
"""


def test_a_killed_upgrade_leaves_its_lock_and_a_rerun_breaks_it_and_finishes(
    file_target: Target, caplog: pytest.LogCaptureFixture
) -> None:
    """A real process dies between steps 2 and 3: its exclusive lock stays, the next run on
    this host sees its holder is dead, breaks the lock and writes the last step."""
    m, data = _v1_repository(file_target, PW)
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_UPGRADE, file_target.url, "3", PW.decode()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 9, child.stderr
    locks = [o.key for o in file_target.backend().list(LOCKS_PREFIX)]
    assert len(locks) == 1
    with file_target.open(PW) as mid:
        assert mid.config.version == 2 and read_back(mid, m, "vda") == data
    caplog.set_level(logging.WARNING)
    assert _upgrade(file_target, PW) == [Step.BIND_NEW]
    assert any("breaking exclusive lock" in r.getMessage() for r in caplog.records)
    _check_upgraded(file_target, PW, m, data)
    assert list(file_target.backend().list(LOCKS_PREFIX)) == []


def test_wrong_or_missing_passphrase_changes_nothing(file_target: Target) -> None:
    _v1_repository(file_target, PW)
    before = _objects(file_target)
    with file_target.open(PW) as repo:
        with pytest.raises(PassphraseError, match="wrong passphrase"):
            upgrade_repository(repo, b"not it")
        with pytest.raises(PassphraseError, match="passphrase_file"):
            upgrade_repository(repo, None)
    assert _objects(file_target) == before
    assert list(file_target.backend().list(LOCKS_PREFIX)) == []


def test_upgrade_waits_for_no_backup(target: Target) -> None:
    """A backup in flight holds a shared lease: the upgrade refuses, retryable, naming it."""
    _v1_repository(target, PW)
    before = _objects(target)
    with target.open(PW) as repo:
        backup = Lease(repo.backend, "shared", "backup web1/in-flight", 600).acquire()
        try:
            with pytest.raises(
                RepositoryLockedError,
                match=r"upgrade needs the repository to itself.*shared lock for backup web1",
            ) as err:
                upgrade_repository(repo, PW)
            assert err.value.retryable
        finally:
            backup.release()
    assert _objects(target) == before
    assert _upgrade(target, PW) == [Step.BIND_BOTH, Step.CONFIG, Step.BIND_NEW]


def test_a_key_from_before_the_binding_gets_bound_by_the_upgrade(file_target: Target) -> None:
    m, data = _v1_repository(file_target, PW)
    with file_target.open(PW) as repo:
        repo.backend.put(KEY_KEY, _legacy_key_object(PW, repo.config.id, _master(repo)))
    assert _upgrade(file_target, PW) == [Step.BIND_BOTH, Step.CONFIG, Step.BIND_NEW]
    _check_upgraded(file_target, PW, m, data)


def test_rolling_config_back_after_the_upgrade_is_refused(target: Target) -> None:
    """The final key binds the new config alone: the v1 config bytes put back are an edit."""
    m, data = _v1_repository(target, PW)
    old_config = _objects(target)[CONFIG_KEY]
    assert _upgrade(target, PW) == [Step.BIND_BOTH, Step.CONFIG, Step.BIND_NEW]
    b = target.backend()
    new_config = b.get(CONFIG_KEY)
    b.put(CONFIG_KEY, old_config)
    with pytest.raises(ConfigMismatchError, match="config object was altered"):
        target.open(PW)
    b.put(CONFIG_KEY, new_config)
    _check_upgraded(target, PW, m, data)


# --------------------------------------------------------------------------- key version 3


def _forged_key(passphrase: bytes, repo_id: str, version: int, plaintext: bytes) -> bytes:
    """A key object wrapping ``plaintext`` as written by someone who knows the passphrase."""
    salt, nonce = secrets.token_bytes(16), secrets.token_bytes(12)
    kek = Scrypt(salt=salt, length=32, n=FAST_SCRYPT, r=8, p=1).derive(passphrase)
    wrapped = AESGCM(kek).encrypt(nonce, plaintext, f"vmvault key {repo_id}".encode())
    doc = {
        "version": version,
        "kdf": "scrypt",
        "n": FAST_SCRYPT,
        "r": 8,
        "p": 1,
        "salt": base64.b64encode(salt).decode(),
        "cipher": "aes-256-gcm",
        "nonce": base64.b64encode(nonce).decode(),
        "wrapped_key": base64.b64encode(wrapped).decode(),
    }
    return json.dumps(doc).encode()


@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_a_version_3_key_accepts_any_of_its_configs(count: int) -> None:
    master = os.urandom(MASTER_KEY_SIZE)
    configs = [b'{"config": %d}' % i for i in range(count)]
    data = new_multi_config_key_object(PW, "id", configs, master, n=FAST_SCRYPT)
    assert json.loads(data)["version"] == 3
    for c in configs:
        key = unwrap_key_object(data, PW, "id", c)
        assert key.master == master and key.version == 3 and len(key.digests) == count
    with pytest.raises(ConfigMismatchError, match="config object was altered"):
        unwrap_key_object(data, PW, "id", b'{"config": "another"}')
    with pytest.raises(PassphraseError):
        unwrap_key_object(data, b"not it", "id", configs[0])


@pytest.mark.parametrize(
    ("version", "extra"),
    [
        (3, 0),  # no digest at all
        (3, 5 * 32),  # five digests: more than a key object may bind
        (3, 32 + 7),  # a truncated second digest
        (2, 2 * 32),  # version 2 binds exactly one config
        (2, 0),
    ],
    ids=["v3-no-digest", "v3-five-digests", "v3-truncated", "v2-two-digests", "v2-no-digest"],
)
def test_a_malformed_key_object_is_corrupt(file_target: Target, version: int, extra: int) -> None:
    repo = file_target.init(PW)
    config = file_target.backend().get(CONFIG_KEY)
    tail = (config_digest(config) * 6)[:extra]
    repo.backend.put(KEY_KEY, _forged_key(PW, repo.config.id, version, _master(repo) + tail))
    with pytest.raises(CorruptObjectError, match=rf"key object version {version}: wrapped key"):
        file_target.open(PW)
    # An upgrade reads the key object again under its lock, and refuses it likewise.
    with pytest.raises(CorruptObjectError, match=rf"key object version {version}: wrapped key"):
        upgrade_repository(repo, PW)
    repo.close()


def test_a_key_object_newer_than_version_3_asks_for_a_newer_vmvault(file_target: Target) -> None:
    repo = file_target.init(PW)
    data = json.loads(file_target.backend().get(KEY_KEY))
    data["version"] = 4
    repo.backend.put(KEY_KEY, json.dumps(data).encode())
    with pytest.raises(UnsupportedVersionError, match=r"key object version 4.*upgrade vmvault"):
        file_target.open(PW)


def test_plan_upgrade_follows_the_state_table() -> None:
    from vmvault.storage.crypto import Keys, UnwrappedKey

    old, new = b"o" * 32, b"n" * 32
    master = bytes(MASTER_KEY_SIZE)

    def key(version: int, *digests: bytes) -> UnwrappedKey:
        return UnwrappedKey(Keys.from_master(master), master, version, digests, FAST_SCRYPT)

    all_three = [Step.BIND_BOTH, Step.CONFIG, Step.BIND_NEW]
    assert plan_upgrade(1, key(1), new) == all_three
    assert plan_upgrade(1, key(2, old), new) == all_three
    assert plan_upgrade(1, key(3, old), new) == all_three
    assert plan_upgrade(1, key(3, old, new), new) == [Step.CONFIG, Step.BIND_NEW]
    assert plan_upgrade(2, key(3, old, new), new) == [Step.BIND_NEW]
    assert plan_upgrade(2, key(2, new), new) == []
    assert plan_upgrade(2, key(3, new), new) == []
    assert plan_upgrade(1, None, new) == [Step.CONFIG]
    assert plan_upgrade(2, None, new) == []
