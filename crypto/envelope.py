"""Seal and open single records (message bodies, subjects, file names, webhook secrets).

    sealed = seal(key, body, {"tenant": t, "column": "messages.body", "row": str(message_id)})
    ref = read_key_ref(sealed)          # -> KeyRef(dek_id, dek_version): find and unwrap that DEK
    body = open_record(key, sealed, {"tenant": t, "column": "messages.body", "row": str(message_id)})

The byte layout is documented in the `crypto` package docstring. Every failure to open raises the same
`DecryptionError`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import NamedTuple
from uuid import UUID

from crypto import _format
from crypto.errors import DecryptionError
from crypto.keys import DataKey

__all__ = [
    "RECORD_HEADER_BYTES",
    "RECORD_MAGIC",
    "RECORD_OVERHEAD_BYTES",
    "DataKey",
    "DecryptionError",
    "KeyRef",
    "key_ref_bytes",
    "open_record",
    "open_records",
    "read_key_ref",
    "seal",
]

RECORD_MAGIC = _format.RECORD_MAGIC
_RECORD_LABEL = b"bedside.record"

RECORD_HEADER_BYTES = _format.PREFIX.size + _format.SALT_BYTES + _format.COMMITMENT_BYTES + _format.NONCE_BYTES
RECORD_OVERHEAD_BYTES = RECORD_HEADER_BYTES + _format.TAG_BYTES  # 118


class KeyRef(NamedTuple):
    """Which data key sealed a record: look it up, unwrap it, then open the record with it."""

    dek_id: UUID
    dek_version: int


def seal(key: DataKey, plaintext: bytes, context: Mapping[str, str]) -> bytes:
    """Encrypt `plaintext` under `key`, bound to `context`, with a fresh random salt and nonce.

    `context` is an ordered mapping of str to str naming where the record lives (tenant,
    "table.column", row id, thread, sender, schema version...). `open_record` must be given the same
    mapping, in the same order, or it fails: a ciphertext copied to another row, column or tenant does
    not open.
    """
    return _seal_with(
        key, plaintext, context, salt=os.urandom(_format.SALT_BYTES), nonce=os.urandom(_format.NONCE_BYTES)
    )


def _seal_with(key: DataKey, plaintext: bytes, context: Mapping[str, str], *, salt: bytes, nonce: bytes) -> bytes:
    """`seal` with caller-chosen salt and nonce. Only for known-answer tests: reusing them is fatal."""
    if not isinstance(plaintext, bytes):
        raise TypeError("plaintext must be bytes")
    return _format.seal_core(
        key,
        _RECORD_LABEL,
        _format.prefix(RECORD_MAGIC, key),
        plaintext,
        _format.encode_context(context),
        salt,
        nonce,
    )


def open_record(key: DataKey, record: bytes, context: Mapping[str, str]) -> bytes:
    """Decrypt a record made by `seal` with the same key and the same context, in the same order.

    Raises `DecryptionError` for every failure: wrong magic, unknown version or suite, truncation,
    another key, another context, any changed byte.
    """
    (plaintext,) = open_records(key, [(record, context)])
    return plaintext


def open_records(key: DataKey, items: Iterable[tuple[bytes, Mapping[str, str]]]) -> list[bytes]:
    """`open_record` for each `(record, context)` sealed under `key`, in order: a page of messages.

    The same checks and the same single `DecryptionError` (raised for the first record that fails; none
    of the others is returned), with the header prefix and the key-derivation info computed once for
    the batch instead of once per record, and the context entries the records share encoded once.
    """
    expected = _format.prefix(RECORD_MAGIC, key)
    info = _format.kdf_info(_RECORD_LABEL, key)
    memo: dict[tuple[str, str], bytes] = {}  # the entries the records share are encoded once
    opened = []
    for record, context in items:
        _format.check_prefix(expected, record)
        try:
            aad_suffix = _format.encode_context(context, memo)
        except ValueError:
            # A context that cannot be encoded was never used to seal anything.
            raise DecryptionError from None
        opened.append(_format.open_core(key, info, record, RECORD_HEADER_BYTES, aad_suffix))
    return opened


def key_ref_bytes(sealed: bytes) -> bytes:
    """The header bytes that name the key of a record or chunk (magic, version, suite, DEK id and
    version), unparsed and unchecked: two records with equal bytes here name the same key, so a caller
    opening many can look a key up once per distinct value and skip `read_key_ref` for the rest.
    Opening still checks the whole header against the key."""
    return sealed[: _format.PREFIX.size]


def read_key_ref(sealed: bytes) -> KeyRef:
    """Return the (dek_id, dek_version) named in the header of a record or attachment chunk.

    Nothing is decrypted or authenticated here: the header is authenticated when the record is opened.
    Raises `DecryptionError` if `sealed` is not a record or chunk of a known version and suite.
    """
    if not isinstance(sealed, bytes) or len(sealed) < RECORD_OVERHEAD_BYTES:
        raise DecryptionError
    magic, version, suite, dek_id, dek_version = _format.PREFIX.unpack_from(sealed)
    if (
        magic not in (_format.RECORD_MAGIC, _format.CHUNK_MAGIC)
        or version != _format.FORMAT_VERSION
        or suite != _format.SUITE_HKDF_SHA256_AES256GCM
    ):
        raise DecryptionError
    return KeyRef(UUID(bytes=dek_id), dek_version)
