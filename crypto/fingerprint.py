"""Keyed request fingerprints: what makes two requests sent with one `Idempotency-Key` the same request.

A fingerprint is kept with the key for a day (and in every backup taken meanwhile). An unkeyed hash of
the request would let anyone holding the database alone confirm a guess of what a short message said
("yes", a diagnosis): hash the guess, compare. So the fingerprint is an HMAC under a key derived from a
data key, which the database holds only wrapped by the KEK:

    fkey        = HKDF-SHA256(ikm = DEK secret, salt = none,
                              info = "bedside.fingerprint" || 0x01 || dek_id || u32(dek_version),
                              length = 32)
    fingerprint = 0x01 || HMAC-SHA256(fkey, request)

`request` is the caller's canonical encoding of what makes the request what it is. The first byte is the
format version, so a fingerprint of another version (or an unkeyed digest of 32 bytes, from before) never
equals one of these. The label keeps the derived key apart from the per-record keys `crypto.envelope`
derives from the same DEK ("bedside.record", with a random salt).
"""

from __future__ import annotations

import hmac
import struct
from hashlib import sha256

from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from crypto.keys import DataKey

__all__ = ["FINGERPRINT_BYTES", "FINGERPRINT_VERSION", "fingerprint"]

FINGERPRINT_VERSION = 1
FINGERPRINT_BYTES = 1 + 32
_LABEL = b"bedside.fingerprint"


def fingerprint(key: DataKey, request: bytes) -> bytes:
    """The request's fingerprint under `key` (33 bytes: the version, then the HMAC). Deterministic: the
    same key and request give the same bytes in any process; compare them with `hmac.compare_digest`."""
    if not isinstance(request, bytes):
        raise TypeError("the request to fingerprint must be bytes")
    info = _LABEL + bytes([FINGERPRINT_VERSION]) + key.id.bytes + struct.pack(">I", key.version)
    derived = HKDF(algorithm=SHA256(), length=32, salt=None, info=info).derive(key.secret)
    return bytes([FINGERPRINT_VERSION]) + hmac.digest(derived, request, sha256)
