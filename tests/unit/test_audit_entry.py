"""The canonical audit entry encoding is what every leaf hashes: it must never change silently, or
`audit verify` could no longer read old logs."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from uuid import UUID

import pytest

from service.domain.audit import AuditAction, AuditEvent, canonical_details, decode_entry, encode_entry
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
