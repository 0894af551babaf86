"""Known-answer vectors: the committed JSON pins the record, chunk and wrap-AAD formats byte for byte.

Each vector is checked twice: against `crypto` itself, and against a from-the-spec reference written
here with only `struct`, `hmac` (RFC 5869 HKDF) and AES-GCM, so the vectors describe the documented
format, not merely whatever the code happens to do.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from crypto import envelope, stream
from crypto.errors import DecryptionError
from crypto.kek import dek_wrap_aad
from crypto.keys import DataKey

VECTORS = Path(__file__).parent / "vectors"


def _load(name: str) -> list[dict[str, Any]]:
    data = json.loads((VECTORS / name).read_text(encoding="utf-8"))
    vectors: list[dict[str, Any]] = data["vectors"]
    assert vectors
    return vectors


RECORD_VECTORS = _load("record_v1.json")
CHUNK_VECTORS = _load("chunk_v1.json")
WRAP_AAD_VECTORS = _load("dek_wrap_aad_v1.json")


# ---- reference implementation, written from the crypto package docstring ----


def ref_hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    okm, block, counter = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length]


def ref_lp(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def ref_context(pairs: list[list[str]]) -> bytes:
    out = struct.pack(">I", len(pairs))
    for key, value in pairs:
        out += ref_lp(key.encode()) + ref_lp(value.encode())
    return out


def ref_seal(
    magic: bytes,
    label: bytes,
    position: bytes,
    v: dict[str, Any],
    plaintext: bytes,
    aad_suffix: bytes,
    salt: bytes,
    nonce: bytes,
) -> tuple[bytes, bytes, bytes]:
    dek_id = UUID(v["dek_id"]).bytes
    version = struct.pack(">I", v["dek_version"])
    okm = ref_hkdf_sha256(bytes.fromhex(v["dek_secret"]), salt, label + b"\x01\x01" + dek_id + version, 64)
    header = magic + b"\x01\x01" + dek_id + version + position + salt + okm[32:] + nonce
    aad = header + aad_suffix
    return header + AESGCM(okm[:32]).encrypt(nonce, plaintext, aad), aad, okm[32:]


def ref_record(v: dict[str, Any]) -> tuple[bytes, bytes, bytes]:
    return ref_seal(
        b"BSDR",
        b"bedside.record",
        b"",
        v,
        bytes.fromhex(v["plaintext"]),
        ref_context(v["context"]),
        bytes.fromhex(v["salt"]),
        bytes.fromhex(v["nonce"]),
    )


def ref_chunk(v: dict[str, Any], c: dict[str, Any]) -> bytes:
    suffix = ref_lp(v["object_id"].encode()) + ref_context(v["context"])
    position = struct.pack(">QB", c["index"], 1 if c["final"] else 0)
    sealed, _, _ = ref_seal(
        b"BSDC",
        b"bedside.chunk",
        position,
        v,
        bytes.fromhex(c["plaintext"]),
        suffix,
        bytes.fromhex(c["salt"]),
        bytes.fromhex(c["nonce"]),
    )
    return sealed


def ref_wrap_aad(v: dict[str, Any]) -> bytes:
    return (
        b"bedside.dek-wrap\x01"
        + UUID(v["dek_id"]).bytes
        + struct.pack(">I", v["dek_version"])
        + ref_lp(v["tenant"].encode())
        + ref_lp(v["patient"].encode())
    )


# ---- helpers ----


def key_of(v: dict[str, Any]) -> DataKey:
    return DataKey(UUID(v["dek_id"]), v["dek_version"], bytes.fromhex(v["dek_secret"]))


def context_of(v: dict[str, Any]) -> dict[str, str]:
    return {key: value for key, value in v["context"]}


def ids(vectors: list[dict[str, Any]]) -> list[str]:
    return [v["name"] for v in vectors]


# ---- records ----


@pytest.mark.parametrize("v", RECORD_VECTORS, ids=ids(RECORD_VECTORS))
def test_record_vector_is_reproduced_byte_for_byte(v: dict[str, Any]) -> None:
    record = envelope._seal_with(
        key_of(v),
        bytes.fromhex(v["plaintext"]),
        context_of(v),
        salt=bytes.fromhex(v["salt"]),
        nonce=bytes.fromhex(v["nonce"]),
    )
    assert record.hex() == v["record"]


@pytest.mark.parametrize("v", RECORD_VECTORS, ids=ids(RECORD_VECTORS))
def test_record_vector_opens_and_names_its_key(v: dict[str, Any]) -> None:
    record = bytes.fromhex(v["record"])
    assert envelope.open_record(key_of(v), record, context_of(v)).hex() == v["plaintext"]
    assert envelope.read_key_ref(record) == (UUID(v["dek_id"]), v["dek_version"])


@pytest.mark.parametrize("v", RECORD_VECTORS, ids=ids(RECORD_VECTORS))
def test_record_vector_matches_the_documented_format(v: dict[str, Any]) -> None:
    record, aad, commitment = ref_record(v)
    assert record.hex() == v["record"]
    assert aad.hex() == v["aad"]
    assert commitment.hex() == v["commitment"]
    assert len(record) == envelope.RECORD_OVERHEAD_BYTES + len(v["plaintext"]) // 2


def test_record_vectors_do_not_open_in_each_others_context() -> None:
    first, second = RECORD_VECTORS[0], RECORD_VECTORS[1]
    with pytest.raises(DecryptionError):
        envelope.open_record(key_of(second), bytes.fromhex(second["record"]), context_of(first))


# ---- chunks ----


@pytest.mark.parametrize("v", CHUNK_VECTORS, ids=ids(CHUNK_VECTORS))
def test_chunk_vector_is_reproduced_byte_for_byte(v: dict[str, Any]) -> None:
    suffix = stream._aad_suffix(v["object_id"], context_of(v))
    for c in v["chunks"]:
        chunk = stream._seal_chunk_with(
            key_of(v),
            bytes.fromhex(c["plaintext"]),
            suffix,
            c["index"],
            c["final"],
            salt=bytes.fromhex(c["salt"]),
            nonce=bytes.fromhex(c["nonce"]),
        )
        assert chunk.hex() == c["chunk"]
        assert ref_chunk(v, c).hex() == c["chunk"]


@pytest.mark.parametrize("v", CHUNK_VECTORS, ids=ids(CHUNK_VECTORS))
def test_chunk_vector_opens_as_a_stream(v: dict[str, Any]) -> None:
    chunks = [bytes.fromhex(c["chunk"]) for c in v["chunks"]]
    opened = stream.open_stream(key_of(v), chunks, object_id=v["object_id"], context=context_of(v))
    assert b"".join(opened).hex() == "".join(c["plaintext"] for c in v["chunks"])


# ---- wrap AAD ----


@pytest.mark.parametrize("v", WRAP_AAD_VECTORS, ids=ids(WRAP_AAD_VECTORS))
def test_dek_wrap_aad_vector(v: dict[str, Any]) -> None:
    aad = dek_wrap_aad(dek_id=UUID(v["dek_id"]), dek_version=v["dek_version"], tenant=v["tenant"], patient=v["patient"])
    assert aad.hex() == v["aad"]
    assert ref_wrap_aad(v).hex() == v["aad"]
