"""The notifications hook point: a committed message writes one webhook outbox row per endpoint that
should hear of it, in its own transaction; with no endpoints nothing at all, and a refused send never
leaves a row behind."""

from __future__ import annotations

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from service.settings import Settings
from tests.api.messaging_helpers import consent, patient, physician, thread
from tests.api.webhook_helpers import register
from tests.conftest import Dsns, Portals
from tests.support import as_owner

Client = TestClient[web.Request, web.Application]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Endpoints on loopback may be registered; no delivery worker, so rows stay as the send wrote them."""
    return settings.model_copy(update={"webhook_allow_http_loopback": True, "webhook_worker": False})


async def _outbox(owner_dsn: str) -> list[tuple[str, str]]:
    """Every outbox row, as (event type, message id or '-'), oldest first."""

    async def work(conn: asyncpg.Connection) -> list[tuple[str, str]]:
        rows = await conn.fetch(
            "SELECT event_type, coalesce(payload->>'message_id', '-') AS message_id FROM webhook_outbox "
            "ORDER BY created_at, event_type"
        )
        return [(r["event_type"], r["message_id"]) for r in rows]

    rows: list[tuple[str, str]] = await as_owner(owner_dsn, work)
    return rows


async def test_with_no_endpoints_messages_insert_no_outbox_rows(
    client: Client, portals: Portals, database: Dsns
) -> None:
    await consent(client, portals)
    created = await thread(client, portals, message="first")
    url = f"/v1/threads/{created['id']}/messages"
    for who in (patient(portals), physician(portals)):
        assert (await client.post(url, json={"body": "and another"}, headers=who)).status == 201
    listed = await (await client.get(url, headers=patient(portals))).json()
    assert [m["seq"] for m in listed["items"]] == [1, 2, 3]  # committed
    assert await _outbox(database.owner) == []


async def test_endpoints_that_should_not_hear_of_a_message_get_no_row(
    client: Client, portals: Portals, database: Dsns
) -> None:
    await register(client, portals, "http://127.0.0.1:9/outsider", subscriber="Practitioner/8")  # not in the thread
    await register(client, portals, "http://127.0.0.1:9/recalls", event_types=["message.recalled"])
    await consent(client, portals)
    created = await thread(client, portals, message=None)
    sent = await client.post(
        f"/v1/threads/{created['id']}/messages", json={"body": "not for them"}, headers=patient(portals)
    )
    assert sent.status == 201
    assert await _outbox(database.owner) == []

    message_id = (await sent.json())["id"]
    assert (await client.post(f"/v1/messages/{message_id}/recall", headers=patient(portals))).status == 200
    assert await _outbox(database.owner) == [("message.recalled", message_id)]  # what it does want


async def test_refused_sends_insert_no_outbox_rows(client: Client, portals: Portals, database: Dsns) -> None:
    await register(client, portals, "http://127.0.0.1:9/hooks", subscriber="Practitioner/7")
    grant = await consent(client, portals)
    created = await thread(client, portals, message=None)
    url = f"/v1/threads/{created['id']}/messages"
    sent = await client.post(url, json={"body": "heard by the endpoint"}, headers=patient(portals))
    assert sent.status == 201
    heard = [("thread.created", "-"), ("message.created", (await sent.json())["id"])]
    assert await _outbox(database.owner) == heard  # the endpoint is live: a committed send is a row

    revoke = await client.post(
        f"/v1/consents/{grant['id']}/revoke", json={"reason": "patient-request"}, headers=patient(portals)
    )
    assert revoke.status == 200
    heard.append(("consent.revoked", "-"))
    refused = await client.post(url, json={"body": "no consent"}, headers=patient(portals))
    assert refused.status == 403
    assert (await refused.json())["code"] == "consent-required"
    assert await _outbox(database.owner) == heard

    await consent(client, portals)
    closed = await client.post(f"/v1/threads/{created['id']}/close", headers=patient(portals))
    assert closed.status == 200
    late = await client.post(url, json={"body": "after closing"}, headers=patient(portals))
    assert late.status == 409
    assert await _outbox(database.owner) == heard
