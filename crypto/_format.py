"""Byte-level building blocks shared by records, chunks and wraps (private; see the package docstring).

Everything here is a pure function of its arguments: the canonical context encoding, the suite 1 key
schedule, and the common `seal`/`open` core that records and chunks both use.
"""

from __future__ import annotations

import hmac
import struct
from collections.abc import Iterable, Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from crypto.errors import DecryptionError
from crypto.keys import DataKey

RECORD_MAGIC = b"BSDR"
CHUNK_MAGIC = b"BSDC"
FORMAT_VERSION = 1
SUITE_HKDF_SHA256_AES256GCM = 1

SALT_BYTES = 32
COMMITMENT_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
AES_KEY_BYTES = 32

# magic(4) version(1) suite(1) dek_id(16) dek_version(4): the start of every record and chunk header.
PREFIX = struct.Struct(">4sBB16sI")
_U32 = struct.Struct(">I")
_MAX_U32 = 2**32 - 1


def u32(value: int) -> bytes:
    """Big-endian unsigned 32-bit encoding; raises ValueError when out of range."""
    if not 0 <= value <= _MAX_U32:
        raise ValueError("value does not fit in an unsigned 32-bit field")
    return _U32.pack(value)


def length_prefixed(data: bytes) -> bytes:
    """`u32(len(data)) || data`: the unambiguous way every variable-length field is written."""
    return u32(len(data)) + data


def text_field(value: str, what: str) -> bytes:
    """UTF-8 encode `value` (strictly: lone surrogates are rejected) and length-prefix it."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be str, not {type(value).__name__}")
    try:
        encoded = value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid Unicode text (lone surrogate)") from None
    return length_prefixed(encoded)


def encode_context(context: Mapping[str, str], memo: dict[tuple[str, str], bytes] | None = None) -> bytes:
    """Canonical encoding of an ordered str -> str mapping.

    `u32(count) || for each (key, value) in order: u32(len) || key || u32(len) || value`, UTF-8.
    Order matters on purpose: callers build the context the same way at seal and at open.

    This runs for every record sealed or opened, so each entry is encoded in one flat step (the same
    bytes as `text_field` for the key and the value). `memo`: a dict that a caller encoding many
    contexts (a page of records: one tenant, one column, one thread) passes to each call, so that an
    entry seen before is not encoded again.
    """
    if not isinstance(context, Mapping):
        raise TypeError("context must be a mapping of str to str")
    pack = _U32.pack
    parts = [pack(len(context))]
    append = parts.append
    # Typed loosely on purpose: callers' annotations are not checked at run time, this loop is.
    items: Iterable[tuple[object, object]] = context.items()
    for key, value in items:
        if not isinstance(key, str) or not isinstance(value, str):
            what = "context key" if not isinstance(key, str) else "context value"
            bad = key if not isinstance(key, str) else value
            raise TypeError(f"{what} must be str, not {type(bad).__name__}")
        entry = None if memo is None else memo.get((key, value))
        if entry is None:
            try:
                k, v = key.encode("utf-8"), value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("context is not valid Unicode text (lone surrogate)") from None
            if len(k) > _MAX_U32 or len(v) > _MAX_U32:
                raise ValueError("value does not fit in an unsigned 32-bit field")
            entry = pack(len(k)) + k + pack(len(v)) + v
            if memo is not None:
                memo[(key, value)] = entry
        append(entry)
    return b"".join(parts)


def prefix(magic: bytes, key: DataKey) -> bytes:
    """The fixed header prefix that `key` writes for records (or chunks) of this version and suite."""
    return PREFIX.pack(magic, FORMAT_VERSION, SUITE_HKDF_SHA256_AES256GCM, key.id.bytes, key.version)


def check_prefix(expected: bytes, sealed: bytes) -> None:
    """Raise DecryptionError unless `sealed` starts with exactly `expected`, the `prefix` its key would
    have written (computed by the caller, once for all the records it opens under that key).

    Strict on purpose: an unknown version or suite is an error, never a fallback to another one.
    """
    if not isinstance(sealed, bytes) or sealed[: PREFIX.size] != expected:
        raise DecryptionError


def derive_suite1(key: DataKey, salt: bytes, info: bytes) -> tuple[bytes, bytes]:
    """HKDF-SHA256(ikm=DEK, salt, info) -> 64 bytes, split as (AES-256-GCM key, key commitment)."""
    okm = HKDF(algorithm=SHA256(), length=AES_KEY_BYTES + COMMITMENT_BYTES, salt=salt, info=info).derive(key.secret)
    return okm[:AES_KEY_BYTES], okm[AES_KEY_BYTES:]


def kdf_info(label: bytes, key: DataKey) -> bytes:
    """`label || version || suite || dek_id || u32(dek_version)`: binds the derived key to its header."""
    return label + bytes((FORMAT_VERSION, SUITE_HKDF_SHA256_AES256GCM)) + key.id.bytes + u32(key.version)


def seal_core(
    key: DataKey,
    label: bytes,
    header_before_salt: bytes,
    plaintext: bytes,
    aad_suffix: bytes,
    salt: bytes,
    nonce: bytes,
) -> bytes:
    """Build `header_before_salt || salt || commitment || nonce || ciphertext+tag`.

    The AAD is everything before the ciphertext followed by `aad_suffix`.
    """
    if len(salt) != SALT_BYTES or len(nonce) != NONCE_BYTES:
        raise ValueError("salt and nonce must be 32 and 12 bytes")
    aes_key, commitment = derive_suite1(key, salt, kdf_info(label, key))
    header = header_before_salt + salt + commitment + nonce
    return header + AESGCM(aes_key).encrypt(nonce, plaintext, header + aad_suffix)


def open_core(key: DataKey, info: bytes, record: bytes, header_len: int, aad_suffix: bytes) -> bytes:
    """Check the key commitment in constant time, then decrypt. The caller has validated the prefix;
    `info` is `kdf_info(label, key)`, which a caller opening many records computes once."""
    if len(record) < header_len + TAG_BYTES:
        raise DecryptionError
    salt_at = header_len - SALT_BYTES - COMMITMENT_BYTES - NONCE_BYTES
    salt = record[salt_at : salt_at + SALT_BYTES]
    commitment = record[salt_at + SALT_BYTES : salt_at + SALT_BYTES + COMMITMENT_BYTES]
    nonce = record[header_len - NONCE_BYTES : header_len]
    aes_key, expected = derive_suite1(key, salt, info)
    if not hmac.compare_digest(expected, commitment):
        raise DecryptionError
    header = record[:header_len]
    try:
        return AESGCM(aes_key).decrypt(nonce, record[header_len:], header + aad_suffix)
    except InvalidTag:
        raise DecryptionError from None
