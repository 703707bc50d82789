"""Sealing: pieces equal the sealed bytes, and incompressible bodies skip zstd."""

from __future__ import annotations

import os
import secrets

import pytest

from vmvault.storage.crypto import COMPRESSION_NONE, COMPRESSION_ZSTD, Codec, Keys

MiB = 1024 * 1024


@pytest.mark.parametrize("encrypted", [False, True])
def test_pieces_join_to_an_object_that_unseals(encrypted: bool) -> None:
    codec = Codec(Keys.from_master(secrets.token_bytes(64)) if encrypted else None)
    text = bytes(os.urandom(4 * MiB)).translate(bytes(b"abcd"[i % 4] for i in range(256)))
    for body in (os.urandom(4 * MiB), text, bytearray(text), memoryview(text), b"small"):
        stored = b"".join(codec.seal_parts("chunks/aa/k", body))
        assert codec.unseal("chunks/aa/k", stored, limit=len(body)) == bytes(body)
        if not encrypted:
            assert stored == codec.seal("chunks/aa/k", body)


def test_random_chunks_are_stored_raw_mixed_ones_compressed() -> None:
    codec = Codec(None)
    random = os.urandom(4 * MiB)
    kind, payload = codec.seal_parts("k", random)
    assert kind == bytes([COMPRESSION_NONE]) and payload is random  # no copy either
    # Random with one compressible MiB: the sample sees it, the chunk is compressed.
    mixed = random[: 3 * MiB] + bytes(MiB)
    kind, payload = codec.seal_parts("k", mixed)
    assert kind == bytes([COMPRESSION_ZSTD]) and len(payload) < 3.1 * MiB
    # Small bodies are always tried.
    assert codec.seal_parts("k", b"z" * 1000)[0] == bytes([COMPRESSION_ZSTD])
