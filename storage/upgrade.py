"""Upgrading a version 1 repository to version 2: ``config`` (and ``key``) rewritten, crash-safe.

docs/repository-format.md, section 27. Only ``config`` and, when encrypted, ``key``
change: old manifests and indexes stay version 1 and keep their meaning. The key object
binds the config's bytes (section 5), so rewriting ``config`` means rewriting ``key``
too, and no order of two single-object writes keeps the pair valid throughout. A
version 3 key object that accepts both configs bridges the gap:

    state found (under the exclusive lock)    steps left
    config v1, key v1 or v2 (old config)      1 key v3 {old, new}   2 config v2   3 key v2 {new}
    config v1, key v3 {old, new}                                    2             3
    config v2, key v3 {..., new}                                                  3
    config v2, key v2 {new}                   none: "already version 2"
    unencrypted: config v1                    2
    unencrypted: config v2                    none

Each state in the table opens with the passphrase, so a crash anywhere leaves a usable
repository, and running the upgrade again finishes the steps left. The new config is the
old one's JSON with ``version`` and ``sub_block`` set, so a second run derives the same
bytes (and digest) as the first.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from enum import Enum
from typing import Any

from vmvault.storage.backends import Backend
from vmvault.storage.crypto import (
    MULTI_CONFIG_KEY_VERSION,
    UnwrappedKey,
    config_digest,
    new_key_object,
    new_multi_config_key_object,
)
from vmvault.storage.errors import (
    CorruptObjectError,
    RepositoryLockedError,
)
from vmvault.storage.format import (
    CONFIG_KEY,
    KEY_KEY,
    MAX_CONFIG_BYTES,
    SUB_BLOCK_SIZE,
    RepoConfig,
    parse_json,
)
from vmvault.storage.locks import Lease
from vmvault.storage.progress import Progress
from vmvault.storage.repository import Repository, read_config_and_key

log = logging.getLogger(__name__)

# The version this module upgrades to. Spelled out rather than FORMAT_VERSION: a later
# format needs its own thought about what an upgrade rewrites.
TARGET_VERSION = 2


class Step(Enum):
    """One write of the upgrade, in the order they must happen (section 27)."""

    BIND_BOTH = "key-v3"
    CONFIG = "config-v2"
    BIND_NEW = "key-v2"

    @property
    def description(self) -> str:
        return {
            Step.BIND_BOTH: "key object version 3, accepting the old and the new config",
            Step.CONFIG: f"config version {TARGET_VERSION} (sub_block {SUB_BLOCK_SIZE})",
            Step.BIND_NEW: "key object version 2, bound to the new config alone",
        }[self]


@dataclass(frozen=True)
class UpgradeReport:
    """What ``upgrade_repository`` found and did; ``steps`` is empty when nothing was left."""

    url: str
    encrypted: bool
    version_before: int
    version: int
    steps: list[Step]

    @property
    def changed(self) -> bool:
        return bool(self.steps)

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "encrypted": self.encrypted,
            "version_before": self.version_before,
            "version": self.version,
            "changed": self.changed,
            "steps": [s.value for s in self.steps],
        }


def upgraded_config(raw: bytes, url: str) -> bytes:
    """The version 2 config object for the version 1 config object ``raw``.

    Its JSON with ``version`` and ``sub_block`` set and every other member as it was
    (unknown ones included), in the layout ``RepoConfig.to_bytes`` writes. Deterministic:
    a run after a crash must find the digest the first run bound into the key object.
    """
    doc = parse_json(raw, f"{url}: config object", MAX_CONFIG_BYTES)
    if not isinstance(doc, dict):
        raise CorruptObjectError(f"{url}: config object is not a JSON object")
    doc["version"] = TARGET_VERSION
    doc["sub_block"] = SUB_BLOCK_SIZE
    new = json.dumps(doc, indent=2).encode() + b"\n"
    RepoConfig.from_bytes(new, url)  # what every reader will check
    return new


def plan_upgrade(
    config_version: int, key: UnwrappedKey | None, new_digest: bytes | None
) -> list[Step]:
    """The steps left for a repository found in this state (the module docstring's table).

    ``key``: the unwrapped key object (None when unencrypted), already checked to accept
    the current config. ``new_digest``: BLAKE3 of the version 2 config (the current one
    when it is version 2 already).
    """
    if config_version >= TARGET_VERSION:
        # A version 3 key still accepts some other config (the old one): bind the
        # current one alone. A single-digest key is the finished state.
        return [Step.BIND_NEW] if key is not None and len(key.digests) > 1 else []
    if key is None:
        return [Step.CONFIG]
    bridged = key.version == MULTI_CONFIG_KEY_VERSION and new_digest in key.digests
    return ([] if bridged else [Step.BIND_BOTH]) + [Step.CONFIG, Step.BIND_NEW]


def upgrade_repository(
    repo: Repository, passphrase: bytes | None, progress: Progress | None = None
) -> UpgradeReport:
    """Bring ``repo`` to format version 2 (section 27), or finish an interrupted upgrade.

    Takes the exclusive lock, so it fails (retryable) while a backup, prune or GC runs.
    ``passphrase``: the repository's (None when unencrypted); the key object is re-wrapped
    under it. ``repo`` still describes the repository as it was opened: open it again to
    use the upgraded one.
    """
    try:
        lease = Lease(repo.backend, "exclusive", "upgrade", repo.lease_ttl).acquire()
    except RepositoryLockedError as err:
        raise RepositoryLockedError(
            f"upgrade needs the repository to itself (no backup, prune or gc running): {err}"
        ) from err
    try:
        return _run(repo.backend, repo.url, passphrase, lease, progress)
    finally:
        lease.release()


def _read_state(
    backend: Backend, url: str, passphrase: bytes | None
) -> tuple[bytes, RepoConfig, UnwrappedKey | None]:
    """``config`` as stored, parsed, and the unwrapped key: read again under the lock,
    with the same refusals as ``open_repository`` (section 5)."""
    config, raw, key = read_config_and_key(backend, url, passphrase)
    return raw, config, key


def _run(
    backend: Backend,
    url: str,
    passphrase: bytes | None,
    lease: Lease,
    progress: Progress | None,
) -> UpgradeReport:
    raw, config, key = _read_state(backend, url, passphrase)
    new_raw = raw if config.version >= TARGET_VERSION else upgraded_config(raw, url)
    steps = plan_upgrade(config.version, key, config_digest(new_raw))
    if not steps:
        log.info("%s is already format version %d: nothing to do", url, config.version)
        return UpgradeReport(url, config.encrypted, config.version, config.version, [])
    log.info(
        "upgrading %s from format version %d: %s",
        url,
        config.version,
        ", ".join(s.value for s in steps),
    )
    for done, step in enumerate(steps):
        if progress:
            progress("upgrade", done, len(steps))
        # Our exclusive lease must still hold: a lapsed one lets backups start meanwhile.
        lease.check()
        if step is Step.BIND_BOTH:
            assert key is not None and passphrase
            data = new_multi_config_key_object(
                passphrase, config.id, [raw, new_raw], key.master, n=key.n
            )
            backend.put(KEY_KEY, data)
        elif step is Step.CONFIG:
            backend.put(CONFIG_KEY, new_raw)
        else:
            assert key is not None and passphrase
            data, _ = new_key_object(passphrase, config.id, new_raw, key.master, n=key.n)
            backend.put(KEY_KEY, data)
        log.info("%s: wrote %s", url, step.description)
    if progress:
        progress("upgrade", len(steps), len(steps))
    # Read back what a reader will find: the new config, and a key accepting it alone.
    final_raw, final, final_key = _read_state(backend, url, passphrase)
    if final_raw != new_raw or (final_key is not None and len(final_key.digests) != 1):
        raise CorruptObjectError(
            f"{url}: after the upgrade, config or key is not what was written (another "
            "process changed them?): run 'vmvault upgrade' again"
        )
    return UpgradeReport(url, config.encrypted, config.version, final.version, steps)
