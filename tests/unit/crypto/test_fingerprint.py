"""Keyed request fingerprints: stable for one key and request, different for anything else, and nothing
a database holder could recompute from a guess without the key."""

from __future__ import annotations

import hashlib
import hmac
import struct
from uuid import UUID

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.fingerprint import FINGERPRINT_BYTES, fingerprint
from crypto.keys import DataKey

CHEAP = settings(max_examples=300, deadline=None)

KEY_A = DataKey(UUID("6f1c2a4e-9b7d-4c3e-8a21-5d0f3b7e9c11"), 1, bytes(range(32)))
KEY_B = DataKey(UUID("0190d6a4-2222-7000-8000-00000000000b"), 1, bytes(range(32, 64)))
requests = st.binary(max_size=256)


def _reference(key: DataKey, request: bytes) -> bytes:
    """The documented construction, written out with the standard library alone (RFC 5869 HKDF)."""
    info = b"bedside.fingerprint\x01" + key.id.bytes + struct.pack(">I", key.version)
    prk = hmac.digest(b"\x00" * 32, key.secret, hashlib.sha256)  # extract, no salt
    derived = hmac.digest(prk, info + b"\x01", hashlib.sha256)  # expand, one block of 32 bytes
    return b"\x01" + hmac.digest(derived, request, hashlib.sha256)


def test_the_construction_is_the_documented_one() -> None:
    request = b'["message","th-1","yes",[],null]'
    assert fingerprint(KEY_A, request) == _reference(KEY_A, request)
    # Pinned: fingerprints stored yesterday must still match today, so the bytes may never change.
    assert fingerprint(KEY_A, request).hex() == "018cee9922281408b614f2783d3b8b0171bd1aca2305e52ce28311b82d39493841"


@CHEAP
@given(requests)
def test_the_same_key_and_request_give_the_same_fingerprint(request: bytes) -> None:
    assert fingerprint(KEY_A, request) == fingerprint(KEY_A, bytes(request))
    assert fingerprint(KEY_A, request)[0] == 1
    assert len(fingerprint(KEY_A, request)) == FINGERPRINT_BYTES


@CHEAP
@given(requests, requests)
def test_different_requests_give_different_fingerprints(first: bytes, second: bytes) -> None:
    if first != second:
        assert fingerprint(KEY_A, first) != fingerprint(KEY_A, second)


@CHEAP
@given(requests)
def test_without_the_key_a_guess_cannot_be_confirmed(request: bytes) -> None:
    # What a dump of the database would let anyone check: the unkeyed digest of a guessed request.
    keyed = fingerprint(KEY_A, request)
    assert keyed[1:] != hashlib.sha256(request).digest()
    assert keyed != fingerprint(KEY_B, request)


def test_the_key_id_and_version_are_bound_not_just_the_secret() -> None:
    same_secret_other_id = DataKey(UUID(int=7), 1, KEY_A.secret)
    same_secret_other_version = DataKey(KEY_A.id, 2, KEY_A.secret)
    fingerprints = {fingerprint(k, b"yes") for k in (KEY_A, same_secret_other_id, same_secret_other_version)}
    assert len(fingerprints) == 3


def test_the_fingerprint_key_is_not_a_record_key() -> None:
    # The derived key is for this purpose only: the raw DEK as an HMAC key gives another value.
    assert fingerprint(KEY_A, b"yes")[1:] != hmac.digest(KEY_A.secret, b"yes", hashlib.sha256)


def test_only_bytes_are_fingerprinted() -> None:
    with pytest.raises(TypeError):
        fingerprint(KEY_A, "yes")  # type: ignore[arg-type]
