"""The canonical audit entry encoding is what every leaf hashes: it must never change silently, or
`audit verify` could no longer read old logs."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from uuid import UUID

import pytest

from service.domain.audit import (
    AuditAction,
    AuditEvent,
    canonical_details,
    decode_entry,
    encode_entry,
    key_id_of,
    token_id_of,
)
from service.domain.principal import Principal, Role
from service.store.audit import OutboxRow

ROW = OutboxRow(
    event_id=UUID("00000000-0000-4000-8000-000000000001"),
    occurred_at=datetime(2026, 11, 21, 12, 0, 0, 123456, tzinfo=UTC),
    tenant_id=UUID("00000000-0000-4000-8000-0000000000aa"),
    action="key:shred",
    outcome="success",
    actor="Practitioner/a1",
    actor_role="admin",
    issuer="https://portal.acme.test",
    act_for=None,
    patient="Patient/1",
    resource_type="DataKey",
    resource_id="k1",
    purpose=None,
    request_id="req-1",
    source="127.0.0.1",
    details='{"reason":"x"}',
    entry=b"",
)


def test_the_entry_encoding_is_pinned() -> None:
    entry = encode_entry(ROW)
    assert len(entry) == 472
    assert hashlib.sha256(entry).hexdigest() == "4e194b77c592414dfce435d06dd434c2aa5408726458ebfa844da229fee08680"


def test_an_entry_decodes_to_the_event_it_encodes() -> None:
    fields = decode_entry(encode_entry(ROW))
    assert fields["format"] == "bedside-audit/1"
    assert fields["occurred_at"] == "2026-11-21T12:00:00.123456Z"
    assert fields["patient"] == "Patient/1"
    assert fields["act_for"] is None
    assert fields["details"] == '{"reason":"x"}'


def test_a_token_id_is_an_actor_field_of_the_entry_and_pinned_too() -> None:
    entry = encode_entry(ROW, token_id="jti-1")
    # The 472 bytes above, one more field counted, and u16 8 "token_id", tag 2, u32 5 "jti-1" after act_for.
    assert len(entry) == 472 + 2 + 8 + 1 + 4 + 5
    assert hashlib.sha256(entry).hexdigest() == "3b410055a97074652a3e8642d6c039f1899746921b4c848d23eb6a57c5ef1043"
    fields = decode_entry(entry)
    assert fields["token_id"] == "jti-1"
    assert list(fields)[list(fields).index("act_for") + 1] == "token_id"
    assert token_id_of(entry) == "jti-1"


def test_an_entry_without_a_token_id_keeps_the_encoding_of_every_earlier_leaf() -> None:
    # Events recorded before the token id existed, and events with no token (the operator's, the
    # system's, a token without a jti), have no such field at all: their bytes, and so their leaf hashes,
    # are those the test above pins.
    assert encode_entry(ROW, token_id=None) == encode_entry(ROW)
    assert "token_id" not in decode_entry(encode_entry(ROW))
    assert token_id_of(encode_entry(ROW)) is None


def test_the_verifying_keys_id_follows_the_token_id_and_is_pinned_too() -> None:
    entry = encode_entry(ROW, token_id="jti-1", key_id="portal-key-1")
    # The 492 bytes of the token id's form, one more field counted, and u16 6 "key_id", tag 2, u32 12
    # "portal-key-1" right after token_id.
    assert len(entry) == 492 + 2 + 6 + 1 + 4 + 12
    assert hashlib.sha256(entry).hexdigest() == "2dd559a144629e38c66c9f59e61ea17f0db41b37395d7ee4371187b2c7f5ad08"
    fields = list(decode_entry(entry))
    assert fields[fields.index("act_for") + 1 : fields.index("act_for") + 3] == ["token_id", "key_id"]
    assert (token_id_of(entry), key_id_of(entry)) == ("jti-1", "portal-key-1")
    # A token without a jti: the key id alone, right after act_for.
    alone = encode_entry(ROW, key_id="portal-key-1")
    assert hashlib.sha256(alone).hexdigest() == "3f393e464d04491c8afc96ed7e8e9e027723b58830aefa73b1c6310fa5e1717b"
    assert list(decode_entry(alone))[list(decode_entry(alone)).index("act_for") + 1] == "key_id"
    assert (token_id_of(alone), key_id_of(alone)) == (None, "portal-key-1")


def test_an_entry_without_a_key_id_keeps_the_encoding_of_every_earlier_leaf() -> None:
    assert encode_entry(ROW, token_id="jti-1", key_id=None) == encode_entry(ROW, token_id="jti-1")
    assert encode_entry(ROW, key_id=None) == encode_entry(ROW)
    assert key_id_of(encode_entry(ROW)) is None


def test_an_event_made_for_a_request_carries_its_tokens_id() -> None:
    principal = Principal(
        tenant_id=ROW.tenant_id or UUID(int=0),
        tenant="acme",
        subject="Patient/1",
        role=Role.PATIENT,
        issuer="https://portal.acme.test",
        token_id="jti-1",
        key_id="portal-key-1",
    )
    event = AuditEvent.by(principal, AuditAction.CONSENT_READ)
    assert (event.token_id, event.key_id) == ("jti-1", "portal-key-1")
    operator = AuditEvent.by_operator(AuditAction.KEY_STATUS)
    assert (operator.token_id, operator.key_id) == (None, None)


def test_details_are_canonical_json() -> None:
    assert canonical_details({"b": 1, "a": ["x", "y"], "c": True}) == '{"a":["x","y"],"b":1,"c":true}'


@pytest.mark.parametrize(
    "details",
    [
        {"Body": "x"},  # keys are snake_case names
        {"note": "x" * 201},  # values are identifiers, not text
        {"nested": {"a": 1}},  # no structures
    ],
)
def test_details_that_could_carry_content_are_refused(details) -> None:
    with pytest.raises(ValueError, match="audit detail"):
        canonical_details(details)


def test_a_denied_event_carries_its_reason() -> None:
    event = AuditEvent(action=AuditAction.AUTH_DENIED).denied("expired")
    assert event.outcome == "denied"
    assert event.details == {"reason": "expired"}
