"""The backup repository: open/init, the backup writer, the disk reader, manifests.

Data flows one way: ``RegionDiskWriter`` (storage/region_writer.py) → thread pool (digests,
zstd, AES-GCM, conditional upload) → disk index on ``finish`` → manifest on
``commit``, last. docs/repository-format.md specifies the objects.

Chunk arithmetic (chunk_size = C, disk of virtual_size V):

    offset 0      C      2C            kC          V
           |------|------|---- ... ----|-----|
            chunk0 chunk1               tail (V - kC bytes, may be < C)
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from vmvault.storage.backends import Backend, RetryPolicy, open_backend
from vmvault.storage.crypto import (
    SCRYPT_N,
    Codec,
    UnwrappedKey,
    new_key_object,
    unwrap_key_object,
)
from vmvault.storage.errors import (
    BackupNotFoundError,
    ConfigMismatchError,
    CorruptObjectError,
    FormatUpgradeNeededError,
    ObjectNotFoundError,
    PassphraseError,
    RepositoryExistsError,
    RepositoryNotFoundError,
    StorageError,
    WriterError,
)
from vmvault.storage.format import (
    BACKUPS_PREFIX,
    CONFIG_KEY,
    DEFAULT_CHUNK_SIZE,
    FORMAT_VERSION,
    KEY_KEY,
    LOCKS_PREFIX,
    MANIFEST_NAME,
    MAX_CONFIG_BYTES,
    MAX_KEY_BYTES,
    MAX_MANIFEST_BYTES,
    VERIFICATION_NAME,
    DamagedManifest,
    DiskStats,
    Kind,
    Manifest,
    ManifestDisk,
    RepoConfig,
    backup_prefix,
    canonical_json,
    check_backup_id,
    check_chunk_size,
    check_name,
    chunk_key,
    manifest_key,
    new_backup_id,
    parse_backup_key,
    parse_json,
    stored_limit,
)
from vmvault.storage.locks import DEFAULT_LEASE_TTL, Lease
from vmvault.storage.region_store import RegionStore

if TYPE_CHECKING:
    from vmvault.storage.disk_reader import DiskReader
    from vmvault.storage.writer import BackupWriter

__all__ = [
    "DamagedManifest",
    "DiskStats",
    "Manifest",
    "ManifestDisk",
    "ManifestScan",
    "Repository",
    "init_repository",
    "open_repository",
]

log = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 8


@dataclass(frozen=True)
class ManifestScan:
    """Every manifest object under a prefix: the readable ones (oldest first) and the
    damaged ones (unreadable, unauthentic, or disagreeing with their key)."""

    manifests: list[Manifest]
    damaged: list[DamagedManifest]


class Repository:
    """An opened repository. Thread-safe; one instance can serve many backups at once."""

    def __init__(
        self,
        backend: Backend,
        config: RepoConfig,
        codec: Codec,
        concurrency: int = DEFAULT_CONCURRENCY,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        master_key: bytes | None = None,
        config_bytes: bytes | None = None,
    ) -> None:
        self.backend = backend
        self.config = config
        # The config object exactly as stored: the key object binds these bytes.
        self._config_bytes = config_bytes if config_bytes is not None else config.to_bytes()
        self.codec = codec
        self.concurrency = concurrency
        self.lease_ttl = lease_ttl
        self._master = master_key
        # Format 2 objects (chunk tables and bodies, fragments, region rebuilds).
        self.regions = RegionStore(backend, codec, config.chunk_size)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    # ------------------------------------------------------------------ basics

    @property
    def url(self) -> str:
        return self.backend.url

    @property
    def chunk_size(self) -> int:
        return self.config.chunk_size

    @property
    def encrypted(self) -> bool:
        return self.config.encrypted

    @property
    def pool(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="repo")
            return self._pool

    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
        self.backend.close()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def chunk_digest(self, data: bytes) -> str:
        """Digest of plaintext ``data`` as the index records it (keyed when encrypted)."""
        return self.codec.digest(data)

    def change_passphrase(self, new_passphrase: bytes) -> None:
        """Re-wrap the master key under ``new_passphrase``; no other object changes.

        The new key object binds the config object as it was read at open (version 2),
        so this is also how a repository made before the binding gets it (the same
        passphrase may be given again).
        """
        if self._master is None:
            raise PassphraseError(f"{self.url} is not encrypted: there is no passphrase")
        data, _ = new_key_object(new_passphrase, self.config.id, self._config_bytes, self._master)
        self.backend.put(KEY_KEY, data)

    # ------------------------------------------------------------------ chunks

    def read_chunk(self, digest: str, check: bool = True) -> bytes:
        """Plaintext of one chunk, re-hashed: ``CorruptObjectError`` if it does not match.

        ``check=False`` skips the re-hash, for a caller that checks the digest of the
        data itself later (restore reads every chunk back and compares it with the index).
        """
        key = chunk_key(digest)
        cs = self.chunk_size
        data = self.codec.unseal(key, self.backend.get(key, max_size=stored_limit(cs)), limit=cs)
        if check and self.codec.digest(data) != digest:
            raise CorruptObjectError(f"chunk {digest} does not match its digest")
        return data

    # ------------------------------------------------------------------ manifests

    def _load_manifest_key(self, key: str) -> Manifest:
        stored = self.backend.get(key, max_size=stored_limit(MAX_MANIFEST_BYTES))
        raw = self.codec.decrypt(key, stored)
        doc = parse_json(raw, f"manifest {key}", MAX_MANIFEST_BYTES)
        if not isinstance(doc, dict) or "checksum" not in doc:
            raise CorruptObjectError(f"manifest {key} has no checksum")
        checksum = doc.pop("checksum")
        if checksum != self.codec.digest(canonical_json(doc)):
            raise CorruptObjectError(f"manifest {key} does not match its checksum (edited?)")
        manifest = Manifest.from_json(doc, key)
        if manifest.key != key:
            raise CorruptObjectError(f"manifest {key} names another backup ({manifest.key})")
        return manifest

    def seal_manifest(self, manifest: Manifest) -> bytes:
        """The stored bytes of ``manifest``: checksummed JSON, encrypted when the repository
        is (what ``_load_manifest_key`` reads back)."""
        doc = manifest.to_json()
        doc["checksum"] = self.codec.digest(canonical_json(doc))
        raw = json.dumps(doc, indent=2).encode() + b"\n"
        return self.codec.encrypt(manifest.key, raw)

    def backup_objects(self, domain: str | None = None) -> list[tuple[str, str, str, str]]:
        """``(domain, backup_id, leaf, key)`` of every well-named object under
        ``backups/`` (of ``domain`` or all): one listing, for callers that need several
        kinds of them (``vmvault list``: manifests and verification records)."""
        prefix = BACKUPS_PREFIX
        if domain is not None:
            prefix += check_name(domain, "domain") + "/"
        out = []
        for info in self.backend.list(prefix):
            parsed = parse_backup_key(info.key)
            if parsed:
                out.append((*parsed, info.key))
        return out

    def manifest_keys(
        self,
        domain: str | None = None,
        listing: list[tuple[str, str, str, str]] | None = None,
    ) -> list[tuple[str, str, str]]:
        """``(domain, backup_id, key)`` of every manifest object (unparsed); from
        ``listing`` (``backup_objects``) when given."""
        objects = self.backup_objects(domain) if listing is None else listing
        return [(d, b, key) for d, b, leaf, key in objects if leaf == MANIFEST_NAME]

    def scan_manifests(
        self,
        domain: str | None = None,
        listing: list[tuple[str, str, str, str]] | None = None,
    ) -> ManifestScan:
        """Read every manifest (of ``domain`` or all); damaged ones are set aside, not raised.

        One damaged manifest must not hide the other backups of its domain: listing,
        planning the next backup, prune and restores of the intact backups go on without
        it. A manifest of a newer format version still stops everything (upgrade first),
        and so does a backend failure.
        """

        def load(entry: tuple[str, str, str]) -> Manifest | DamagedManifest | None:
            domain_name, backup_id, key = entry
            try:
                return self._load_manifest_key(key)
            except ObjectNotFoundError:
                return None  # deleted (pruned) between listing and reading
            except CorruptObjectError as err:
                return DamagedManifest(domain_name, backup_id, key, str(err))

        manifests: list[Manifest] = []
        damaged: list[DamagedManifest] = []
        for result in self.pool.map(load, self.manifest_keys(domain, listing)):
            if isinstance(result, Manifest):
                manifests.append(result)
            elif result is not None:
                damaged.append(result)
        manifests.sort(key=lambda m: m.sort_key)
        damaged.sort(key=lambda d: (d.domain, d.backup_id))
        return ManifestScan(manifests, damaged)

    def list_manifests(self, domain: str | None = None) -> list[Manifest]:
        """Committed, readable backups (of ``domain`` or all), oldest first.

        Damaged manifests are skipped with a WARNING naming each (``scan_manifests``
        returns them).
        """
        scan = self.scan_manifests(domain)
        for d in scan.damaged:
            log.warning("skipping damaged manifest %s: %s (run 'vmvault verify')", d.key, d.error)
        return scan.manifests

    def latest_manifest(self, domain: str) -> Manifest | None:
        manifests = self.list_manifests(domain)
        return manifests[-1] if manifests else None

    def load_manifest(self, domain: str, backup_id: str) -> Manifest:
        key = manifest_key(domain, backup_id)
        try:
            return self._load_manifest_key(key)
        except ObjectNotFoundError:
            raise BackupNotFoundError(
                f"no committed backup {backup_id} of domain {domain} in {self.url}"
            ) from None

    def find_backup(self, backup_id: str) -> Manifest:
        check_backup_id(backup_id)
        for _domain, bid, key in self.manifest_keys():
            if bid == backup_id:
                return self._load_manifest_key(key)
        raise BackupNotFoundError(f"no committed backup {backup_id} in {self.url}")

    def delete_backup(self, manifest: Manifest) -> None:
        """Remove a backup: its manifest first (so it stops existing), then its indexes
        and its verification record (section 30)."""
        self.backend.delete(manifest.key)
        for d in manifest.disks:
            self.backend.delete(d.index_key)
        self.backend.delete(backup_prefix(manifest.domain, manifest.backup_id) + VERIFICATION_NAME)

    # ------------------------------------------------------------------ indexes

    def chunk_names(self, manifest: Manifest, disk_name: str) -> list[str | None]:
        """Per region of the disk: the hex name of the chunk object its bytes are based on
        (a v1 chunk's digest, a v2 chunk's RD, a patched region's base), None for zeros."""
        from vmvault.storage.disk_reader import base_chunk_name

        index = self.disk_reader(manifest, disk_name).index
        return [base_chunk_name(r) for r in index.regions]

    def disk_reader(self, manifest: Manifest, disk_name: str) -> DiskReader:
        """One disk of a backup, read region by region (either format version)."""
        from vmvault.storage.disk_reader import DiskReader  # builds on this module

        return DiskReader(self, manifest, disk_name)

    # ------------------------------------------------------------------ writing

    def open_backup(
        self,
        domain: str,
        parent: Manifest | None,
        kind: Kind,
        reason: str,
        checkpoint: str | None,
    ) -> BackupWriter:
        """Start a backup: takes a shared lease so GC cannot run until commit/abort.
        A version 1 repository takes no new backups (section 27)."""
        check_name(domain, "domain")
        if self.config.version < 2:
            raise FormatUpgradeNeededError(
                f"{self.url} is a format version 1 repository: run 'vmvault upgrade' to "
                "write new backups (existing backups stay readable)"
            )
        if kind not in ("full", "incremental"):
            raise WriterError(f"backup kind must be 'full' or 'incremental', not {kind!r}")
        if kind == "incremental" and parent is None:
            raise WriterError(f"incremental backup of {domain} needs a parent manifest")
        if parent is not None and parent.domain != domain:
            raise WriterError(f"parent {parent.backup_id} belongs to {parent.domain}, not {domain}")
        if parent is not None and parent.chunk_size != self.chunk_size:
            raise WriterError(f"parent {parent.backup_id} has another chunk size")
        if parent is not None and parent.version > self.config.version:
            raise WriterError(f"parent {parent.backup_id} is newer than the repository format")
        now = datetime.now(UTC)
        backup_id = new_backup_id(now)
        lease = self.lease_on(parent, f"backup {domain}/{backup_id}")
        if lease is None:
            assert parent is not None
            raise WriterError(
                f"parent backup {parent.backup_id} of {domain} no longer exists "
                "(pruned meanwhile): take a full backup or use the latest one"
            )
        from vmvault.storage.writer import BackupWriter  # the writer builds on this module

        return BackupWriter(self, domain, backup_id, parent, kind, reason, checkpoint, now, lease)

    def lease_on(self, manifest: Manifest | None, what: str) -> Lease | None:
        """A shared lease (GC held off) for work that needs ``manifest``'s objects; None,
        with nothing held, when the manifest is gone once the lease is.

        The caller read ``manifest`` before its lease existed: a prune (and a GC after it)
        may have removed it and its chunks since. Under the lease, the manifest still
        existing means every object its indexes name does too.
        """
        lease = Lease(self.backend, "shared", what, self.lease_ttl).acquire()
        if manifest is None:
            return lease
        try:
            alive = self.backend.exists(manifest.key)
        except BaseException:
            lease.release()
            raise
        if not alive:
            lease.release()
            return None
        return lease

    # ------------------------------------------------------------------ reading

    def read_disk(
        self, manifest: Manifest, disk_name: str, prefetch: int = 8, check: bool = True
    ) -> Iterator[tuple[int, bytes | None]]:
        """``(offset, plaintext)`` per region in order; None for zeros. At most ``prefetch``
        regions are fetched ahead, so memory stays bounded for any disk size.
        ``check=False``: the caller compares the bytes with the index (see DiskReader)."""
        return self.disk_reader(manifest, disk_name).regions(prefetch, check)


# --------------------------------------------------------------------------- open / init


def init_repository(
    url: str,
    endpoint_url: str | None = None,
    region: str | None = None,
    passphrase: bytes | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    concurrency: int = DEFAULT_CONCURRENCY,
    retry: RetryPolicy | None = None,
    scrypt_n: int | None = None,
    format_version: int = FORMAT_VERSION,
) -> Repository:
    """Create a repository (encrypted when ``passphrase`` is given); refuses an existing one.

    ``format_version`` 1 makes a repository that version 1 vmvault can still use (it
    can be upgraded later: storage/upgrade.py).
    """
    try:
        check_chunk_size(chunk_size)
    except CorruptObjectError as err:
        raise StorageError(str(err)) from None
    if isinstance(format_version, bool) or format_version not in (1, FORMAT_VERSION):
        raise StorageError(
            f"repository format version {format_version} is not one vmvault can create: "
            f"use 1 or {FORMAT_VERSION}"
        )
    backend = open_backend(url, endpoint_url, region, concurrency, retry)
    try:
        config, config_bytes, codec, master = _create_objects(
            backend, url, passphrase, chunk_size, scrypt_n or SCRYPT_N, format_version
        )
    except BaseException:
        backend.close()
        raise
    return Repository(
        backend, config, codec, concurrency, master_key=master, config_bytes=config_bytes
    )


def _create_objects(
    backend: Backend,
    url: str,
    passphrase: bytes | None,
    chunk_size: int,
    scrypt_n: int,
    format_version: int,
) -> tuple[RepoConfig, bytes, Codec, bytes | None]:
    """Write ``key`` (if encrypted) and then ``config``, each only if absent."""
    # A listing fails on a missing bucket, where a PUT may quietly create one (SeaweedFS
    # does): probe first, so that init says "the bucket does not exist" on every store.
    next(iter(backend.list(LOCKS_PREFIX)), None)
    if backend.exists(CONFIG_KEY) or backend.exists(KEY_KEY):
        raise RepositoryExistsError(f"{url} already holds a repository: nothing was changed")
    config = RepoConfig(
        id=secrets.token_hex(16),
        chunk_size=chunk_size,
        encrypted=passphrase is not None,
        created=datetime.now(UTC),
        version=format_version,
    )
    config_bytes = config.to_bytes()
    codec = Codec(None)
    master = None
    if passphrase is not None:
        data, keys = new_key_object(passphrase, config.id, config_bytes, n=scrypt_n)
        master = keys.encryption + keys.hashing
        # Conditional create: a concurrent init cannot overwrite another's key.
        if not backend.put(KEY_KEY, data, if_absent=True):
            raise RepositoryExistsError(f"{url} already holds a repository key: nothing changed")
        codec = Codec(keys)
    if not backend.put(CONFIG_KEY, config_bytes, if_absent=True):
        raise RepositoryExistsError(f"{url} already holds a repository: nothing was changed")
    return config, config_bytes, codec, master


def open_repository(
    url: str,
    endpoint_url: str | None = None,
    region: str | None = None,
    passphrase: bytes | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    retry: RetryPolicy | None = None,
    lease_ttl: float | None = None,
) -> Repository:
    """Open an existing repository; encrypted ones need the passphrase.

    With a passphrase, the repository must be encrypted; an encrypted one must have a
    key object that binds its config (or predates the binding: then a WARNING says how
    to add it). See docs/repository-format.md, sections 5 and 16.
    """
    backend = open_backend(url, endpoint_url, region, concurrency, retry)
    try:
        config, config_bytes, codec, master = _open_objects(backend, url, passphrase)
    except BaseException:
        backend.close()
        raise
    ttl = (
        lease_ttl
        if lease_ttl is not None
        else float(os.environ.get("VMVAULT_LEASE_TTL", DEFAULT_LEASE_TTL))
    )
    return Repository(backend, config, codec, concurrency, ttl, master, config_bytes)


def read_config_and_key(
    backend: Backend, url: str, passphrase: bytes | None
) -> tuple[RepoConfig, bytes, UnwrappedKey | None]:
    """``config`` parsed and as stored, and the unwrapped key object (None: unencrypted),
    with every refusal of section 5: a passphrase for a plain repository, a plain config
    beside a key object (edited), a key that does not bind this config."""
    try:
        raw = backend.get(CONFIG_KEY, max_size=MAX_CONFIG_BYTES)
    except ObjectNotFoundError:
        raise RepositoryNotFoundError(
            f"no repository at {url} (no 'config' object): run 'vmvault init' first"
        ) from None
    config = RepoConfig.from_bytes(raw, url)
    if not config.encrypted:
        # Whoever can write to the store can edit "encryption" to "none": new backups
        # would then be written in plaintext and forged ones read. A configured
        # passphrase, or a key object, says this repository was made encrypted.
        if passphrase:
            raise ConfigMismatchError(
                f"{url} is not encrypted, but repository.passphrase_file is set: refusing to "
                "use it. If the repository was made without encryption, remove "
                "passphrase_file from the config; if not, its config object was altered"
            )
        if backend.exists(KEY_KEY):
            raise ConfigMismatchError(
                f"{url}: the config object says the repository is not encrypted, but it has "
                "a 'key' object: the config was altered; refusing to use it"
            )
        return config, raw, None
    if not passphrase:
        raise PassphraseError(f"{url} is encrypted: set repository.passphrase_file in the config")
    try:
        key_data = backend.get(KEY_KEY, max_size=MAX_KEY_BYTES)
    except ObjectNotFoundError:
        raise CorruptObjectError(f"{url} is encrypted but its 'key' object is missing") from None
    try:
        return config, raw, unwrap_key_object(key_data, passphrase, config.id, raw)
    except ConfigMismatchError as err:
        raise ConfigMismatchError(f"{url}: {err}") from err


def _open_objects(
    backend: Backend, url: str, passphrase: bytes | None
) -> tuple[RepoConfig, bytes, Codec, bytes | None]:
    """Read ``config`` (and ``key``): the config, its bytes, the codec, the master key."""
    config, raw, unwrapped = read_config_and_key(backend, url, passphrase)
    if unwrapped is None:
        return config, raw, Codec(None), None
    if not unwrapped.config_bound:
        log.warning(
            "%s: the key object predates config authentication, so an edit of the config "
            "object would go unnoticed; run 'vmvault passwd --new-passphrase-file FILE' "
            "(the current passphrase file will do) to bind it",
            url,
        )
    return config, raw, Codec(unwrapped.keys), unwrapped.master
