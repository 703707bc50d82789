"""Chunk digests, object sealing (zstd + optional AES-256-GCM) and the passphrase-wrapped key.

Byte layouts are specified in docs/repository-format.md; this module is their code.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import threading
from dataclasses import dataclass
from typing import Any

import blake3
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from vmvault.storage.backends.base import Blob
from vmvault.storage.errors import (
    ConfigMismatchError,
    CorruptObjectError,
    PassphraseError,
    UnsupportedVersionError,
)
from vmvault.storage.format import MAX_KEY_BYTES, parse_json

DIGEST_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
MASTER_KEY_SIZE = 64  # 32 bytes AES-256-GCM key || 32 bytes BLAKE3 hashing key
# Key object versions: 1 wraps the master key alone; 2 wraps master key || BLAKE3-256 of
# the config object's bytes, which authenticates ``config`` under the passphrase; 3 wraps
# master key || 1 to 4 such digests and accepts any of those configs: ``vmvault upgrade``
# writes it for the moment between rewriting ``config`` and binding the new one alone
# (docs/repository-format.md, section 27).
KEY_FILE_VERSION = 2
MULTI_CONFIG_KEY_VERSION = 3
MAX_CONFIG_DIGESTS = 4
_UNBOUND_KEY_VERSION = 1

# First byte of every binary object body (after decryption): how the payload is stored.
COMPRESSION_NONE = 0x00
COMPRESSION_ZSTD = 0x01

# zstd level 1: ~0.4 GB/s per core on disk images with ratios close to level 3.
# The level is not part of the format; any zstd frame is accepted when reading.
_ZSTD_LEVEL = 1
# Compressibility check (``_compressible``): 8 windows of 16 KiB, 3% of a 4 MiB chunk;
# a body is compressed if the sample shrinks to less than 97%. Bodies under 1 MiB are
# always tried (the sample would be too large a share of them).
_SAMPLES = 8
_SAMPLE_WINDOW = 16 * 1024
_SAMPLE_MIN_BODY = 1024 * 1024
_SAMPLE_RATIO = 0.97

# Default scrypt cost: N=2^15, r=8 → 32 MiB and ~0.1 s per unlock on one core.
SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 1


_local = threading.local()


def _zstd() -> zstandard.ZstdCompressor:
    """This thread's compressor: contexts are reusable but not shareable between threads."""
    c = getattr(_local, "c", None)
    if c is None:
        c = _local.c = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
    return c


def _compressible(body: Blob) -> bool:
    """Is zstd worth trying on ``body``? False only when no sample of it compresses.

    Incompressible data (encrypted or already compressed files) still costs zstd about
    0.37 CPU-s per GiB to find out (measured on random 4 MiB chunks), more than BLAKE3.
    A sample of ``_SAMPLES`` windows spread over the body costs ~3% of that. One
    compressible window among them is enough to compress the whole body.
    """
    n = len(body)
    if n < _SAMPLE_MIN_BODY:
        return True
    step = n // _SAMPLES
    view = memoryview(body)
    sample = b"".join(view[i * step : i * step + _SAMPLE_WINDOW] for i in range(_SAMPLES))
    return len(_zstd().compress(sample)) < len(sample) * _SAMPLE_RATIO


def _compressed(body: Blob, compress: bool) -> tuple[int, Blob]:
    """The compression byte and payload of a sealed body: zstd only when it is smaller."""
    if compress and _compressible(body):
        packed = _zstd().compress(body)
        if len(packed) < len(body):
            return COMPRESSION_ZSTD, packed
    return COMPRESSION_NONE, body


def _unzstd() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "d", None)
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    return d


def _inflate(key: str, frame: bytes, limit: int) -> bytes:
    """One zstd frame, decompressed to at most ``limit`` bytes.

    A frame header may declare its content size: one beyond ``limit`` is refused before
    anything is allocated (python-zstandard would allocate whatever it declares, e.g.
    1 TiB from 17 bytes). A frame without it is decompressed into at most ``limit``
    bytes and refused when it needs more; one whose content differs from what it
    declares fails inside zstd.
    """
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as err:
        raise CorruptObjectError(f"object {key!r}: bad zstd data ({err})") from err
    if declared > limit:
        raise CorruptObjectError(
            f"object {key!r}: its zstd frame declares {declared} bytes, more than the "
            f"{limit} expected"
        )
    try:
        out: bytes
        if declared >= 0:
            out = _unzstd().decompress(frame)
        else:
            out = _unzstd().decompress(frame, max_output_size=limit)
        return out
    except zstandard.ZstdError as err:
        raise CorruptObjectError(
            f"object {key!r}: bad zstd data, or more than the {limit} bytes expected ({err})"
        ) from err


@dataclass(frozen=True)
class Keys:
    """The unwrapped master key, split into its two uses."""

    encryption: bytes  # AES-256-GCM key for every sealed object
    hashing: bytes  # BLAKE3 key: chunk digests are keyed so names leak nothing

    @classmethod
    def from_master(cls, master: bytes) -> Keys:
        return cls(master[:32], master[32:64])


class Codec:
    """Digest, seal and open objects of one repository (plain or encrypted)."""

    def __init__(self, keys: Keys | None) -> None:
        self.keys = keys
        self._aead = AESGCM(keys.encryption) if keys else None

    @property
    def encrypted(self) -> bool:
        return self.keys is not None

    def digest(self, data: Blob) -> str:
        """Hex BLAKE3 of plaintext ``data``, keyed with the hashing key when encrypted."""
        return self.raw_digest(data).hex()

    def raw_digest(self, data: Blob) -> bytes:
        """``digest`` as 32 raw bytes (format 2's sub-block and region digests)."""
        if self.keys is not None:
            h = blake3.blake3(data, key=self.keys.hashing, max_threads=1)
        else:
            h = blake3.blake3(data, max_threads=1)
        out: bytes = h.digest()
        return out

    def seal(self, key: str, body: Blob, compress: bool = True) -> bytes:
        """Stored bytes of a binary object: compression byte + payload, then encryption.

        zstd output is kept only when it is smaller than the input. Large bodies whose
        samples do not compress are stored as they are without trying (``_compressible``).
        """
        return b"".join(self.seal_parts(key, body, compress))

    def seal_parts(self, key: str, body: Blob, compress: bool = True) -> tuple[Blob, ...]:
        """``seal`` as pieces whose concatenation is the stored object.

        Unencrypted, the payload is not copied behind its compression byte: a backend
        writes the pieces as they are (a 4 MiB copy per chunk saved).
        """
        kind, payload = _compressed(body, compress)
        if self._aead is None:
            return bytes([kind]), payload
        return (self.encrypt(key, bytes([kind]) + payload),)

    def frame(self, body: Blob, compress: bool = True) -> bytes:
        """The compression byte and payload of ``seal``, before encryption: the costly half,
        which needs no key (``seal_frame`` finishes it once the object key is known)."""
        kind, payload = _compressed(body, compress)
        return bytes([kind]) + bytes(payload)

    def seal_frame(self, key: str, frame: bytes) -> bytes:
        """``seal(key, body)`` from ``frame(body)``."""
        return self.encrypt(key, frame)

    def unseal(self, key: str, stored: bytes, limit: int) -> bytes:
        """Inverse of ``seal``; the body may have at most ``limit`` bytes (a chunk: the chunk
        size; an index: its size from the manifest). ``CorruptObjectError`` names ``key``
        on any damage, and on a body that is or would inflate beyond ``limit``."""
        payload = self.decrypt(key, stored)
        if not payload:
            raise CorruptObjectError(f"object {key!r} is empty")
        kind, body = payload[0], payload[1:]
        if kind == COMPRESSION_NONE:
            if len(body) > limit:
                raise CorruptObjectError(
                    f"object {key!r} holds {len(body)} bytes, more than the {limit} expected"
                )
            return body
        if kind == COMPRESSION_ZSTD:
            return _inflate(key, body, limit)
        raise CorruptObjectError(f"object {key!r}: unknown compression byte 0x{kind:02x}")

    def encrypt(self, key: str, plaintext: bytes) -> bytes:
        """``nonce || AES-256-GCM(plaintext, aad=key)``; the identity when not encrypted.

        The object key is the associated data, so an object moved or copied to
        another key fails authentication.
        """
        if self._aead is None:
            return plaintext
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._aead.encrypt(nonce, plaintext, key.encode())

    def decrypt(self, key: str, stored: bytes) -> bytes:
        if self._aead is None:
            return stored
        if len(stored) < NONCE_SIZE + TAG_SIZE:
            raise CorruptObjectError(f"object {key!r} is truncated ({len(stored)} bytes)")
        try:
            return self._aead.decrypt(stored[:NONCE_SIZE], stored[NONCE_SIZE:], key.encode())
        except InvalidTag:
            raise CorruptObjectError(
                f"object {key!r} failed authentication (modified, truncated or misplaced)"
            ) from None


# --------------------------------------------------------------------------- key object


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: Any, what: str, sizes: range) -> bytes:
    if not isinstance(text, str):
        raise CorruptObjectError(f"key object: {what} is not base64 text")
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError as err:
        raise CorruptObjectError(f"key object: {what} is not base64") from err
    if len(raw) not in sizes:
        raise CorruptObjectError(f"key object: {what} has {len(raw)} bytes")
    return raw


# Bounds on the scrypt cost a key object may ask for: it is attacker-controlled input,
# and N, r, p set memory (128 * r * N bytes) and time (p times that work). The default
# (N=2^15, r=8, p=1) needs 32 MiB.
SCRYPT_MAX_MEMORY = 1024 * 1024 * 1024
SCRYPT_MAX_P = 4


def _scrypt_params(doc: dict[str, Any]) -> tuple[int, int, int]:
    """``(n, r, p)`` of a key object, refused with a clear message when beyond bounds."""
    values = [doc.get(name) for name in ("n", "r", "p")]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        shown = ", ".join(f"{k}={v!r}" for k, v in zip("nrp", values, strict=True))
        raise CorruptObjectError(f"key object: bad scrypt parameters ({shown}): integers expected")
    n, r, p = (int(v) for v in values)  # type: ignore[arg-type]
    if n < 2**10 or n & (n - 1) or not 1 <= r <= 32 or not 1 <= p <= SCRYPT_MAX_P:
        raise CorruptObjectError(
            f"key object: unreasonable scrypt parameters n={n} r={r} p={p} (want n a power "
            f"of two from 1024, r 1 to 32, p 1 to {SCRYPT_MAX_P}); refusing to try them"
        )
    memory = 128 * r * n
    if memory > SCRYPT_MAX_MEMORY:
        raise CorruptObjectError(
            f"key object: scrypt parameters n={n} r={r} p={p} would need "
            f"{memory // 2**20} MiB of memory, more than the {SCRYPT_MAX_MEMORY // 2**20} MiB "
            "allowed; refusing to try them (the key object may have been altered)"
        )
    return n, r, p


def _kek(passphrase: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase)


def _aad(repo_id: str) -> bytes:
    return f"vmvault key {repo_id}".encode()


def config_digest(config_bytes: bytes) -> bytes:
    """BLAKE3-256 of the ``config`` object exactly as stored: any byte changed shows."""
    out: bytes = blake3.blake3(config_bytes).digest()
    return out


@dataclass(frozen=True)
class UnwrappedKey:
    """An unlocked key object: the keys, the raw master key (for re-wrapping), its version,
    and the config digests it binds (none for version 1, which predates the binding)."""

    keys: Keys
    master: bytes
    version: int
    digests: tuple[bytes, ...]
    n: int  # scrypt cost it was made with, so re-wrapping it costs readers the same

    @property
    def config_bound(self) -> bool:
        """Whether the key object authenticates ``config`` (version 2 or 3)."""
        return bool(self.digests)


def new_key_object(
    passphrase: bytes,
    repo_id: str,
    config_bytes: bytes,
    master: bytes | None = None,
    n: int = SCRYPT_N,
) -> tuple[bytes, Keys]:
    """A fresh ``key`` object (JSON) wrapping ``master`` (random if None) under ``passphrase``,
    bound to the config object ``config_bytes`` (version 2)."""
    master = master if master is not None else secrets.token_bytes(MASTER_KEY_SIZE)
    data = _wrap(passphrase, repo_id, KEY_FILE_VERSION, master + config_digest(config_bytes), n)
    return data, Keys.from_master(master)


def new_multi_config_key_object(
    passphrase: bytes, repo_id: str, configs: list[bytes], master: bytes, n: int = SCRYPT_N
) -> bytes:
    """A version 3 ``key`` object wrapping ``master``, accepting each of the config objects
    ``configs`` (1 to ``MAX_CONFIG_DIGESTS``): an upgrade's old and new config."""
    if not 1 <= len(configs) <= MAX_CONFIG_DIGESTS:
        raise ValueError(
            f"a key object binds 1 to {MAX_CONFIG_DIGESTS} configs, not {len(configs)}"
        )
    if len(master) != MASTER_KEY_SIZE:
        raise ValueError(f"a master key has {MASTER_KEY_SIZE} bytes, not {len(master)}")
    plain = master + b"".join(config_digest(c) for c in configs)
    return _wrap(passphrase, repo_id, MULTI_CONFIG_KEY_VERSION, plain, n)


def _wrap(passphrase: bytes, repo_id: str, version: int, plaintext: bytes, n: int) -> bytes:
    """The JSON of a key object of ``version`` wrapping ``plaintext`` (section 5)."""
    if not passphrase:
        raise PassphraseError("an empty passphrase is not allowed")
    salt = secrets.token_bytes(16)
    nonce = secrets.token_bytes(NONCE_SIZE)
    kek = _kek(passphrase, salt, n, SCRYPT_R, SCRYPT_P)
    wrapped = AESGCM(kek).encrypt(nonce, plaintext, _aad(repo_id))
    doc = {
        "version": version,
        "kdf": "scrypt",
        "n": n,
        "r": SCRYPT_R,
        "p": SCRYPT_P,
        "salt": _b64(salt),
        "cipher": "aes-256-gcm",
        "nonce": _b64(nonce),
        "wrapped_key": _b64(wrapped),
    }
    return json.dumps(doc, indent=2).encode() + b"\n"


def _split_wrapped(version: int, plain: bytes) -> tuple[bytes, tuple[bytes, ...]]:
    """``(master key, config digests)`` of an unwrapped plaintext, its length checked."""
    size = len(plain)
    if version == _UNBOUND_KEY_VERSION:
        count = 0
        ok = size == MASTER_KEY_SIZE
        want = f"{MASTER_KEY_SIZE}"
    elif version == KEY_FILE_VERSION:
        count = 1
        ok = size == MASTER_KEY_SIZE + DIGEST_SIZE
        want = f"{MASTER_KEY_SIZE + DIGEST_SIZE}"
    else:
        count, rest = divmod(size - MASTER_KEY_SIZE, DIGEST_SIZE)
        ok = size > MASTER_KEY_SIZE and rest == 0 and 1 <= count <= MAX_CONFIG_DIGESTS
        want = (
            f"{MASTER_KEY_SIZE} + {DIGEST_SIZE} * k, k = 1 to {MAX_CONFIG_DIGESTS} config digests"
        )
    if not ok:
        raise CorruptObjectError(
            f"key object version {version}: wrapped key has {size} bytes, want {want}; "
            "the 'key' object is damaged or forged (restore it from a copy)"
        )
    digests = plain[MASTER_KEY_SIZE:]
    return plain[:MASTER_KEY_SIZE], tuple(
        digests[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE] for i in range(count)
    )


def unwrap_key_object(
    data: bytes, passphrase: bytes, repo_id: str, config_bytes: bytes
) -> UnwrappedKey:
    """Unlock a ``key`` object and check that it binds ``config_bytes`` (version 2, or one
    of the configs of a version 3 key object).

    ``PassphraseError`` for a wrong passphrase; ``ConfigMismatchError`` when the
    passphrase is right but the config object is not one the key was made for;
    ``CorruptObjectError`` naming the key object for anything malformed.
    """
    doc = parse_json(data, "key object", MAX_KEY_BYTES)
    version = doc.get("version") if isinstance(doc, dict) else None
    if not isinstance(version, int) or isinstance(version, bool):
        raise CorruptObjectError("key object is not a vmvault key (no integer version)")
    if version > MULTI_CONFIG_KEY_VERSION:
        raise UnsupportedVersionError(
            f"key object version {version} is newer than this vmvault supports "
            f"({MULTI_CONFIG_KEY_VERSION}): upgrade vmvault"
        )
    if version < _UNBOUND_KEY_VERSION:
        raise CorruptObjectError(f"key object has version {version}: not a vmvault key")
    if doc.get("kdf") != "scrypt" or doc.get("cipher") != "aes-256-gcm":
        raise CorruptObjectError(
            f"key object: unknown kdf/cipher {doc.get('kdf')}/{doc.get('cipher')}"
        )
    n, r, p = _scrypt_params(doc)
    salt = _unb64(doc.get("salt"), "salt", range(16, 65))
    nonce = _unb64(doc.get("nonce"), "nonce", range(NONCE_SIZE, NONCE_SIZE + 1))
    wrapped = _unb64(doc.get("wrapped_key"), "wrapped_key", range(TAG_SIZE, 1025))
    kek = _kek(passphrase, salt, n, r, p)
    try:
        plain = AESGCM(kek).decrypt(nonce, wrapped, _aad(repo_id))
    except InvalidTag:
        raise PassphraseError(
            "wrong passphrase for the repository (or its key object was altered)"
        ) from None
    master, digests = _split_wrapped(version, plain)
    mine = config_digest(config_bytes)
    # Every digest is compared (no early exit), so timing says nothing about which matched.
    matches = [secrets.compare_digest(d, mine) for d in digests]
    if digests and not any(matches):
        raise ConfigMismatchError(
            "the repository's config object was altered after its key was made (it does "
            "not match the digest bound into the key object): refusing to use it; put the "
            "original config object back"
        )
    return UnwrappedKey(Keys.from_master(master), master, version, digests, n)
