"""What a request that finds its Idempotency-Key on record gets back: one rule for threads, messages and
consents alike."""

from __future__ import annotations

import pytest

from service.domain.idempotency import SCRUBBED, replayable
from service.errors import ConflictError, InvalidRequestError
from service.store.idempotency import StoredResponse


def test_the_same_request_gets_the_first_response_again() -> None:
    assert replayable(StoredResponse(b"same", {"message_id": "m-1"}), b"same") == {"message_id": "m-1"}


def test_another_request_with_the_key_is_a_422_that_names_only_the_header() -> None:
    with pytest.raises(InvalidRequestError) as raised:
        replayable(StoredResponse(b"first", {"message_id": "m-1"}), b"second")
    assert [(p.loc, p.type) for p in raised.value.problems] == [(("Idempotency-Key",), "reused")]


@pytest.mark.parametrize("stored_hash", [b"", b"same"])
def test_a_key_whose_request_has_not_completed_is_a_409_whatever_its_hash(stored_hash: bytes) -> None:
    # b"": the store's "in use" (the key was taken, then gone, between its statements).
    with pytest.raises(ConflictError):
        replayable(StoredResponse(stored_hash, None), b"same")


def test_a_key_recorded_before_fingerprints_were_keyed_replays_without_the_check() -> None:
    # Migration 0009 left SCRUBBED in place of the unkeyed digest: a retry gets its first response (the
    # work is never done twice), whatever it says; such keys live out at most a day.
    assert replayable(StoredResponse(SCRUBBED, {"message_id": "m-1"}), b"\x01" + bytes(32)) == {"message_id": "m-1"}
    with pytest.raises(ConflictError):
        replayable(StoredResponse(SCRUBBED, None), b"\x01" + bytes(32))


def test_a_fingerprint_that_differs_only_in_its_last_byte_is_another_request() -> None:
    first = b"\x01" + bytes(32)
    with pytest.raises(InvalidRequestError):
        replayable(StoredResponse(first, {"message_id": "m-1"}), first[:-1] + b"\x01")
