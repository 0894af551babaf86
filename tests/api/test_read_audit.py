"""A read of messages is audited with exactly the messages it returned: the thread and the range of
sequence numbers, from which compliance recovers the message ids (a thread's sequence is dense, and its
messages are never deleted)."""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from tests.api.messaging_helpers import consent, patient, physician, thread
from tests.conftest import Dsns, Portals
from tests.support import audit_events


async def _read_events(owner_dsn: str, resource_id: str) -> list[dict[str, Any]]:
    rows = await audit_events(owner_dsn, "action = 'message:read' AND resource_id = $1", resource_id)
    return [json.loads(r["details"]) for r in rows]


async def _ids_in(owner_dsn: str, thread_id: str, first: int, last: int) -> list[str]:
    owner = await asyncpg.connect(owner_dsn)
    try:
        rows = await owner.fetch(
            "SELECT id::text FROM messages WHERE thread_id = $1 AND seq BETWEEN $2 AND $3 ORDER BY seq",
            thread_id,
            first,
            last,
        )
    finally:
        await owner.close()
    return [r["id"] for r in rows]


async def test_a_page_read_is_audited_with_the_messages_it_returned(client, portals: Portals, database: Dsns) -> None:
    await consent(client, portals)
    created = await thread(client, portals, message="first")
    url = f"/v1/threads/{created['id']}/messages"
    for i in range(5):
        assert (await client.post(url, json={"body": f"m{i}"}, headers=patient(portals))).status == 201

    page = await (await client.get(f"{url}?after=2&limit=3", headers=physician(portals))).json()
    returned = [m["id"] for m in page["items"]]
    assert [m["seq"] for m in page["items"]] == [3, 4, 5]
    empty = await (await client.get(f"{url}?after=6", headers=physician(portals))).json()
    assert empty["items"] == []

    events = await _read_events(database.owner, created["id"])
    assert events[-2] == {"thread_id": created["id"], "returned": 3, "first_seq": 3, "last_seq": 5}
    assert await _ids_in(database.owner, created["id"], 3, 5) == returned
    assert events[-1] == {"thread_id": created["id"], "returned": 0}


async def test_a_recalled_message_in_a_page_counts_as_returned(client, portals: Portals, database: Dsns) -> None:
    await consent(client, portals)
    created = await thread(client, portals, message="first")
    url = f"/v1/threads/{created['id']}/messages"
    sent = await client.post(url, json={"body": "sent by mistake"}, headers=patient(portals))
    assert sent.status == 201
    recalled = await client.post(f"/v1/messages/{(await sent.json())['id']}/recall", headers=patient(portals))
    assert recalled.status == 200, await recalled.text()
    assert (await client.post(url, json={"body": "third"}, headers=patient(portals))).status == 201

    page = await (await client.get(url, headers=physician(portals))).json()
    # The page holds the tombstone too, and the event names the same three messages.
    assert [(m["seq"], m["body"]) for m in page["items"]] == [(1, "first"), (2, None), (3, "third")]
    events = await _read_events(database.owner, created["id"])
    assert events[-1] == {"thread_id": created["id"], "returned": 3, "first_seq": 1, "last_seq": 3}


async def test_a_single_message_read_names_its_sequence_number(client, portals: Portals, database: Dsns) -> None:
    await consent(client, portals)
    created = await thread(client, portals, message="first")
    message_id = created["message"]["id"]
    assert (await client.get(f"/v1/messages/{message_id}", headers=physician(portals))).status == 200
    (event,) = await _read_events(database.owner, message_id)
    assert event == {"thread_id": created["id"], "returned": 1, "first_seq": 1, "last_seq": 1}


async def _failed_reads(owner_dsn: str) -> list[tuple[str, str, str, dict[str, Any]]]:
    rows = await audit_events(owner_dsn, "outcome = 'failure'")
    return [(r["action"], r["resource_type"], r["actor"], json.loads(r["details"])) for r in rows]


async def test_a_read_refused_because_the_patient_was_shredded_is_recorded(
    client, portals: Portals, database: Dsns
) -> None:
    """A 410 is an access that was asked for and not served: it is audited as a failed read."""
    await consent(client, portals)
    created = await thread(client, portals, message="first")
    page = await (await client.get(f"/v1/threads/{created['id']}/messages", headers=physician(portals))).json()
    message_id = page["items"][0]["id"]
    admin = portals.acme.auth(role="admin", sub="Practitioner/admin")
    shred = {"patient": "Patient/1", "confirm": "Patient/1"}
    assert (await client.post("/v1/admin/keys/shred", json=shred, headers=admin)).status == 200
    assert await _failed_reads(database.owner) == []

    for url in (f"/v1/threads/{created['id']}", f"/v1/threads/{created['id']}/messages", f"/v1/messages/{message_id}"):
        gone = await client.get(url, headers=physician(portals))
        assert gone.status == 410, url
        assert (await gone.json())["code"] == "content-shredded"

    assert await _failed_reads(database.owner) == [
        ("thread:read", "Thread", "Practitioner/7", {"reason": "shredded"}),
        (
            "message:read",
            "Thread",
            "Practitioner/7",
            {"thread_id": created["id"], "returned": 1, "first_seq": 1, "last_seq": 1, "reason": "shredded"},
        ),
        (
            "message:read",
            "Message",
            "Practitioner/7",
            {"thread_id": created["id"], "returned": 1, "first_seq": 1, "last_seq": 1, "reason": "shredded"},
        ),
    ]


async def test_break_glass_on_a_shredded_patients_thread_is_recorded_as_failed(
    client, portals: Portals, database: Dsns
) -> None:
    """The grant's reason is sealed with the patient's key, so the opening itself meets the shredding."""
    await consent(client, portals)
    created = await thread(client, portals, message="first")
    admin = portals.acme.auth(role="admin", sub="Practitioner/admin")
    shred = {"patient": "Patient/1", "confirm": "Patient/1"}
    assert (await client.post("/v1/admin/keys/shred", json=shred, headers=admin)).status == 200

    outsider = portals.acme.auth(role="physician", sub="Practitioner/99")
    reason = {"Break-Glass-Reason": "unconscious patient in the emergency room"}
    gone = await client.get(f"/v1/threads/{created['id']}/messages", headers={**outsider, **reason})
    assert gone.status == 410
    assert (await gone.json())["code"] == "content-shredded"
    assert await _failed_reads(database.owner) == [
        ("break_glass:open", "Thread", "Practitioner/99", {"reason": "shredded"})
    ]


async def test_replays_that_meet_a_shred_are_recorded_as_failed_reads(client, portals: Portals, database: Dsns) -> None:
    """A replay (the same Idempotency-Key again) hands back what the first request made: a read, and a
    failed one once the patient was crypto-shredded, for the thread and for the message alike."""
    await consent(client, portals)
    body = {
        "patient": "Patient/1",
        "participants": ["Practitioner/7"],
        "subject": "Question about my medication",
        "message": {"body": "Hello"},
    }
    first = await client.post("/v1/threads", json=body, headers={**patient(portals), "Idempotency-Key": "t-1"})
    assert first.status == 201
    created = await first.json()
    url = f"/v1/threads/{created['id']}/messages"
    sent = await client.post(url, json={"body": "again"}, headers={**patient(portals), "Idempotency-Key": "m-1"})
    assert sent.status == 201
    admin = portals.acme.auth(role="admin", sub="Practitioner/admin")
    shred = {"patient": "Patient/1", "confirm": "Patient/1"}
    assert (await client.post("/v1/admin/keys/shred", json=shred, headers=admin)).status == 200

    again = await client.post("/v1/threads", json=body, headers={**patient(portals), "Idempotency-Key": "t-1"})
    assert again.status == 410
    resent = await client.post(url, json={"body": "again"}, headers={**patient(portals), "Idempotency-Key": "m-1"})
    assert resent.status == 410

    assert await _failed_reads(database.owner) == [
        ("thread:read", "Thread", "Patient/1", {"replay": True, "reason": "shredded"}),
        (
            "message:read",
            "Message",
            "Patient/1",
            {"thread_id": created["id"], "returned": 1, "first_seq": 2, "last_seq": 2, "reason": "shredded"},
        ),
    ]
