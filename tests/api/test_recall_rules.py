"""Recall as the issue specifies it: only the sender, only within the configured window, only before
someone else has read it; a tombstone that says who recalled it and when, the ciphertext kept, the
recall audited without content."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from service.settings import Settings
from tests.api.messaging_helpers import consent, patient, physician, thread
from tests.conftest import Dsns, Portals
from tests.support import as_owner, audit_events, canary

Client = TestClient[web.Request, web.Application]


@pytest.fixture
def settings(settings: Settings, request: pytest.FixtureRequest) -> Settings:
    """The suite's settings, with a test's own overrides (`parametrize("settings", [...], indirect=True)`)."""
    return settings.model_copy(update=getattr(request, "param", {}))


async def _age(owner_dsn: str, message_id: str, seconds: int) -> None:
    """Make the message `seconds` old, as if it had been sent that long ago."""

    async def work(conn: asyncpg.Connection) -> None:
        await conn.execute(
            "UPDATE messages SET created_at = now() - make_interval(secs => $2) WHERE id = $1::uuid",
            message_id,
            float(seconds),
        )

    await as_owner(owner_dsn, work)


async def _stored(owner_dsn: str, message_id: str) -> asyncpg.Record:
    async def work(conn: asyncpg.Connection) -> asyncpg.Record | None:
        return await conn.fetchrow(
            "SELECT body, recalled_at, recalled_by FROM messages WHERE id = $1::uuid", message_id
        )

    row: asyncpg.Record | None = await as_owner(owner_dsn, work)
    assert row is not None
    return row


async def _send(client: Client, thread_id: str, body: str, headers: dict[str, str]) -> dict[str, Any]:
    response = await client.post(f"/v1/threads/{thread_id}/messages", json={"body": body}, headers=headers)
    assert response.status == 201, await response.text()
    sent: dict[str, Any] = await response.json()
    return sent


async def _recall(client: Client, message_id: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    response = await client.post(f"/v1/messages/{message_id}/recall", headers=headers)
    answer: dict[str, Any] = await response.json()
    return response.status, answer


async def _body_seen_by(client: Client, message_id: str, headers: dict[str, str]) -> str | None:
    response = await client.get(f"/v1/messages/{message_id}", headers=headers)
    assert response.status == 200, await response.text()
    body: str | None = (await response.json())["body"]
    return body


async def _thread_with_a_secret(client: Client, portals: Portals) -> tuple[str, dict[str, Any]]:
    """A thread whose first message, the patient's, is a canary: (the canary, the created thread)."""
    await consent(client, portals)
    secret = canary("recalled-body")
    return secret, await thread(client, portals, message=secret)


def _refused_as_conflict(status: int, problem: dict[str, Any]) -> None:
    assert status == 409
    assert problem["type"] == "urn:bedside:problem:conflict"


async def test_the_default_window_is_fifteen_minutes(client: Client, portals: Portals, database: Dsns) -> None:
    await consent(client, portals)
    created = await thread(client, portals, message=None)
    inside = await _send(client, created["id"], "sent 14 minutes ago", patient(portals))
    outside = await _send(client, created["id"], "sent 15 minutes and 5 seconds ago", patient(portals))
    await _age(database.owner, inside["id"], 14 * 60)
    await _age(database.owner, outside["id"], 15 * 60 + 5)

    status, _ = await _recall(client, inside["id"], patient(portals))
    assert status == 200
    assert await _body_seen_by(client, inside["id"], physician(portals)) is None

    status, problem = await _recall(client, outside["id"], patient(portals))
    _refused_as_conflict(status, problem)
    assert await _body_seen_by(client, outside["id"], physician(portals)) == "sent 15 minutes and 5 seconds ago"
    assert (await _stored(database.owner, outside["id"]))["recalled_at"] is None


@pytest.mark.parametrize("settings", [{"recall_window_seconds": 60}], indirect=True)
async def test_the_window_follows_its_setting(client: Client, portals: Portals, database: Dsns) -> None:
    await consent(client, portals)
    created = await thread(client, portals, message=None)
    recent = await _send(client, created["id"], "sent 30 seconds ago", patient(portals))
    older = await _send(client, created["id"], "sent 2 minutes ago", patient(portals))
    await _age(database.owner, recent["id"], 30)
    await _age(database.owner, older["id"], 120)  # well inside the default 15 minutes, outside this one

    status, problem = await _recall(client, older["id"], patient(portals))
    _refused_as_conflict(status, problem)
    assert await _body_seen_by(client, older["id"], physician(portals)) == "sent 2 minutes ago"
    status, _ = await _recall(client, recent["id"], patient(portals))
    assert status == 200


async def test_a_recall_leaves_the_ciphertext_and_a_tombstone_of_who_and_when(
    client: Client, portals: Portals, database: Dsns
) -> None:
    secret, created = await _thread_with_a_secret(client, portals)
    message_id = created["message"]["id"]
    before = await _stored(database.owner, message_id)

    status, answer = await _recall(client, message_id, patient(portals))
    assert status == 200
    assert (answer["body"], answer["recalled_by"]) == (None, "Patient/1")

    after = await _stored(database.owner, message_id)
    assert bytes(after["body"]) == bytes(before["body"])  # kept under retention, untouched
    assert len(after["body"]) > len(secret)
    assert secret.encode() not in bytes(after["body"])  # and still ciphertext
    assert after["recalled_by"] == "Patient/1"
    assert datetime.fromisoformat(answer["recalled_at"]) == after["recalled_at"]

    for who in (physician(portals), patient(portals)):
        tombstone = await (await client.get(f"/v1/messages/{message_id}", headers=who)).json()
        assert tombstone["body"] is None
        assert tombstone["recalled_by"] == "Patient/1"
        assert datetime.fromisoformat(tombstone["recalled_at"]) == after["recalled_at"]
        page = await (await client.get(f"/v1/threads/{created['id']}/messages", headers=who)).json()
        assert [(m["seq"], m["body"], m["recalled_by"]) for m in page["items"]] == [(1, None, "Patient/1")]


async def test_a_recall_is_audited_with_its_actor_and_message_and_no_content(
    client: Client, portals: Portals, database: Dsns
) -> None:
    secret, created = await _thread_with_a_secret(client, portals)
    message_id = created["message"]["id"]
    assert (await _recall(client, message_id, patient(portals)))[0] == 200

    (event,) = await audit_events(database.owner, "action = 'message:recall'")
    assert (event["outcome"], event["actor"], event["actor_role"], event["patient"]) == (
        "success",
        "Patient/1",
        "patient",
        "Patient/1",
    )
    assert (event["resource_type"], event["resource_id"]) == ("Message", message_id)
    assert secret not in json.dumps({k: str(v) for k, v in dict(event).items()})
    assert event["entry"] is None or secret.encode() not in bytes(event["entry"])


async def test_only_the_sender_may_recall(client: Client, portals: Portals, database: Dsns) -> None:
    await consent(client, portals)
    created = await thread(client, portals, message="from the patient")
    reply = await _send(client, created["id"], "from the physician", physician(portals))

    status, problem = await _recall(client, reply["id"], patient(portals))  # a participant, not the sender
    assert status == 404
    assert problem["code"] == "not-found"
    assert await _body_seen_by(client, reply["id"], patient(portals)) == "from the physician"
    denied = await audit_events(database.owner, "action = 'access:denied' AND actor = 'Patient/1'")
    assert [json.loads(e["details"])["attempt"] for e in denied] == ["recall"]
    assert await audit_events(database.owner, "action = 'message:recall'") == []

    status, answer = await _recall(client, reply["id"], physician(portals))
    assert status == 200
    assert answer["recalled_by"] == "Practitioner/7"


async def test_a_receipt_by_someone_else_that_covers_the_message_stops_its_recall(
    client: Client, portals: Portals, database: Dsns
) -> None:
    await consent(client, portals)
    created = await thread(client, portals, message="one")
    two = await _send(client, created["id"], "two", patient(portals))
    three = await _send(client, created["id"], "three", patient(portals))
    await _send(client, created["id"], "four", patient(portals))
    url = f"/v1/threads/{created['id']}/read"

    # The sender's own receipt, and the recipient's receipt that stops short of it, do not count.
    assert (await client.post(url, json={"up_to": 3}, headers=patient(portals))).status == 200
    assert (await client.post(url, json={"up_to": 1}, headers=physician(portals))).status == 200
    assert (await _recall(client, two["id"], patient(portals)))[0] == 200

    # The recipient reads past "three" (seq 3) up to 4: too late for it.
    assert (await client.post(url, json={"up_to": 4}, headers=physician(portals))).status == 200
    status, problem = await _recall(client, three["id"], patient(portals))
    _refused_as_conflict(status, problem)
    assert await _body_seen_by(client, three["id"], physician(portals)) == "three"
    assert [e["resource_id"] for e in await audit_events(database.owner, "action = 'message:recall'")] == [two["id"]]


async def test_a_message_is_recalled_once(client: Client, portals: Portals, database: Dsns) -> None:
    _, created = await _thread_with_a_secret(client, portals)
    message_id = created["message"]["id"]
    status, first = await _recall(client, message_id, patient(portals))
    assert status == 200

    status, problem = await _recall(client, message_id, patient(portals))
    _refused_as_conflict(status, problem)
    assert (await _stored(database.owner, message_id))["recalled_at"] == datetime.fromisoformat(first["recalled_at"])
    assert len(await audit_events(database.owner, "action = 'message:recall'")) == 1


async def test_a_receipt_never_moves_back_so_a_read_message_stays_read(client: Client, portals: Portals) -> None:
    await consent(client, portals)
    created = await thread(client, portals, message="one")
    two = await _send(client, created["id"], "two", patient(portals))
    url = f"/v1/threads/{created['id']}/read"
    assert (await client.post(url, json={"up_to": 2}, headers=physician(portals))).status == 200

    lower = await client.post(url, json={"up_to": 1}, headers=physician(portals))  # a stale tab, say
    assert lower.status == 200
    assert (await lower.json())["up_to"] == 2
    status, problem = await _recall(client, two["id"], patient(portals))
    _refused_as_conflict(status, problem)
    assert await _body_seen_by(client, two["id"], physician(portals)) == "two"


async def test_a_receipt_cannot_cover_a_message_not_yet_sent(client: Client, portals: Portals) -> None:
    await consent(client, portals)
    created = await thread(client, portals, message="one")
    ahead = await client.post(f"/v1/threads/{created['id']}/read", json={"up_to": 2}, headers=physician(portals))
    assert ahead.status == 422
    assert [e["loc"] for e in (await ahead.json())["errors"]] == [["up_to"]]

    # So the message that comes next is unread, and its sender may still take it back.
    two = await _send(client, created["id"], "two", patient(portals))
    status, answer = await _recall(client, two["id"], patient(portals))
    assert (status, answer["recalled_by"]) == (200, "Patient/1")
