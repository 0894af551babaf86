"""Outbound delivery end to end: a send commits, the worker posts a thin signed notification.

Also what is decided at delivery time: consent is asked again (a revoked pair is held and audited, never
sent), each success is an audit event, and no patient content reaches a payload, an attempt or a log."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import time
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from standardwebhooks import Webhook
from structlog.testing import capture_logs

from service.embedded import find_pg_bindir
from service.settings import Settings
from tests.api.messaging_helpers import consent, patient, physician, thread
from tests.api.webhook_helpers import Received, Receiver, admin_get, register, wait_for_delivery
from tests.conftest import Dsns, Portals
from tests.support import canary

WEBHOOK_ID = re.compile(r"^msg_[0-9a-f]{32}$")
RECEIVER_BODY = "receiver body that must never be stored"
AUDIT = """
    SELECT action, resource_id, patient, details FROM audit_outbox WHERE action = $1
    UNION ALL
    SELECT action, resource_id, patient, details FROM audit_leaves WHERE action = $1
"""


@pytest.fixture
def settings(settings: Settings, request: pytest.FixtureRequest) -> Settings:
    """The webhook test settings, with a test's own overrides (`parametrize("settings", [...], indirect=True)`)."""
    return settings.model_copy(update=getattr(request, "param", {}))


async def audit_events(database: Dsns, action: str) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(database.owner)
    try:
        rows = await conn.fetch(AUDIT, action)
    finally:
        await conn.close()
    return [{**dict(r), "details": json.loads(r["details"])} for r in rows]


async def deliveries(client: Any, portals: Portals, endpoint_id: str) -> list[dict[str, Any]]:
    listed = await admin_get(client, portals, f"/v1/admin/webhook-endpoints/{endpoint_id}/deliveries?limit=200")
    items: list[dict[str, Any]] = listed["items"]
    return items


async def test_a_message_reaches_the_receiver_thin_and_signed(client, portals: Portals, receiver: Receiver) -> None:
    """A patient's new thread reaches the physician's receiver, verifiable with the standardwebhooks package."""
    created = await register(client, portals, receiver.url)
    await consent(client, portals)
    made = await thread(client, portals, message="canary-body-do-not-leak")
    await receiver.wait_for(lambda got: {r.json["type"] for r in got} >= {"thread.created", "message.created"})
    for received in receiver.received:
        Webhook(created["secrets"]["outbound_secret"]).verify(received.body, received.headers)
        assert b"canary-body-do-not-leak" not in received.body
        assert received.json["data"]["thread_id"] == made["id"]
        assert abs(int(received.headers["webhook-timestamp"]) - time.time()) < 60


async def test_every_event_is_ids_only_and_matches_the_admin_view(
    client, portals: Portals, receiver: Receiver, database: Dsns
) -> None:
    """thread.created, message.created and message.recalled carry exactly {type, timestamp, data: ids}; the
    webhook-ids are the deliveries' own; each success is delivered, timestamped and audited."""
    created = await register(client, portals, receiver.url)
    endpoint_id = created["endpoint"]["id"]
    await consent(client, portals)
    made = await thread(client, portals, message="first")
    message_id = made["message"]["id"]
    recalled = await client.post(f"/v1/messages/{message_id}/recall", headers=patient(portals))
    assert recalled.status == 200

    await receiver.wait_for(lambda got: len(got) >= 3)
    bodies = {r.json["type"]: r.json for r in receiver.received}
    assert {t: b["data"] for t, b in bodies.items()} == {
        "thread.created": {"thread_id": made["id"]},
        "message.created": {"thread_id": made["id"], "message_id": message_id, "seq": 1},
        "message.recalled": {"thread_id": made["id"], "message_id": message_id},
    }
    for received in receiver.received:
        assert set(received.json) == {"type", "timestamp", "data"}
        assert received.json["timestamp"].endswith("Z")
        sent_at = datetime.fromisoformat(received.json["timestamp"])
        assert abs((datetime.now(UTC) - sent_at).total_seconds()) < 60
        assert WEBHOOK_ID.fullmatch(received.webhook_id)
        assert received.headers["content-type"].startswith("application/json")
        Webhook(created["secrets"]["outbound_secret"]).verify(received.body, received.headers)
    assert len(receiver.received) == 3  # one request each: nothing was sent twice

    listed = await wait_for_delivery(
        client, portals, endpoint_id, lambda items: len(items) == 3 and all(i["status"] == "succeeded" for i in items)
    )
    assert {i["webhook_id"] for i in listed} == {r.webhook_id for r in receiver.received}
    assert all(i["delivered_at"] is not None and i["attempts"] == 1 for i in listed)
    delivered = await audit_events(database, "webhook:deliver")
    assert sorted(e["resource_id"] for e in delivered) == sorted(i["id"] for i in listed)
    assert all(e["patient"] == "Patient/1" and e["details"]["status_code"] == 200 for e in delivered)
    assert all(e["details"]["endpoint_id"] == endpoint_id for e in delivered)


async def test_only_subscribed_events_go_and_only_to_the_subscriber(
    client, portals: Portals, receiver: Receiver
) -> None:
    """An endpoint gets only the event types it chose; a practitioner outside the thread gets nothing."""
    other = Receiver()
    await other.start()
    try:
        mine = await register(client, portals, receiver.url, event_types=["message.created"])
        outsider = await register(client, portals, other.url, subscriber="Practitioner/8")
        await consent(client, portals)
        await thread(client, portals, message="hello")

        await receiver.wait_for(lambda got: len(got) >= 1)
        assert [r.json["type"] for r in receiver.received] == ["message.created"]
        assert [i["event_type"] for i in await deliveries(client, portals, mine["endpoint"]["id"])] == [
            "message.created"
        ]
        assert await deliveries(client, portals, outsider["endpoint"]["id"]) == []
        assert other.received == []
    finally:
        await other.stop()


@pytest.mark.parametrize("settings", [{"webhook_retry_schedule_seconds": (0.5,) * 6}], indirect=True)
async def test_a_consent_revoked_while_a_delivery_waits_holds_it_and_audits_the_hold(
    client, portals: Portals, receiver: Receiver, database: Dsns
) -> None:
    """The patient revokes while the receiver is down: once it is back, the thread's notifications are held
    (consent), never sent, and audited; the grantee hears `consent.revoked` with only the consent id; a
    recovery asks consent again and holds them again."""
    created = await register(client, portals, receiver.url)
    endpoint_id = created["endpoint"]["id"]
    granted = await consent(client, portals)
    await receiver.stop()
    await thread(client, portals, message="sent while the receiver is down")
    failed = await wait_for_delivery(
        client, portals, endpoint_id, lambda items: len(items) == 2 and all(i["attempts"] >= 1 for i in items)
    )
    assert {i["status"] for i in failed} == {"pending"}  # the receiver is down: each waits for its retry

    revoked = await client.post(
        f"/v1/consents/{granted['id']}/revoke", json={"reason": "patient-request"}, headers=patient(portals)
    )
    assert revoked.status == 200
    await receiver.start()

    def settled(items: list[dict[str, Any]]) -> bool:
        by_type = {i["event_type"]: i for i in items}
        return (
            len(items) == 3
            and by_type["consent.revoked"]["status"] == "succeeded"
            and all(by_type[t]["status"] == "held" for t in ("thread.created", "message.created"))
        )

    items = await wait_for_delivery(client, portals, endpoint_id, settled)
    held = [i for i in items if i["status"] == "held"]
    assert {i["held_reason"] for i in held} == {"consent"}
    assert [r.json["type"] for r in receiver.received] == ["consent.revoked"]
    assert receiver.received[0].json["data"] == {"consent_id": granted["id"]}
    Webhook(created["secrets"]["outbound_secret"]).verify(receiver.received[0].body, receiver.received[0].headers)

    holds = await audit_events(database, "webhook:hold")
    assert sorted(e["resource_id"] for e in holds) == sorted(i["id"] for i in held)
    assert all(e["details"]["held_reason"] == "consent" and e["patient"] == "Patient/1" for e in holds)

    until = datetime.now(UTC).isoformat()
    recovered = await client.post(
        f"/v1/admin/webhook-endpoints/{endpoint_id}/recover",
        json={"since": "2000-01-01T00:00:00Z", "until": until},
        headers=portals.acme.auth(role="admin", sub="Practitioner/admin"),
    )
    assert recovered.status == 202, await recovered.text()
    assert (await recovered.json())["recovered"] == 2
    deadline = asyncio.get_running_loop().time() + 10
    while len(await audit_events(database, "webhook:hold")) < 4:
        assert asyncio.get_running_loop().time() < deadline, "the recovered deliveries were not held again"
        await asyncio.sleep(0.05)
    items = await wait_for_delivery(client, portals, endpoint_id, settled)
    assert [r.json["type"] for r in receiver.received] == ["consent.revoked"]


async def test_no_patient_content_in_any_payload_attempt_or_log_line(
    client, portals: Portals, receiver: Receiver, database: Dsns, caplog: pytest.LogCaptureFixture
) -> None:
    """Canaries in a subject and message bodies never reach a receiver, the outbox, the attempt records,
    the admin views or the logs, even through a failed attempt and its retry. Neither does the
    receiver's response body reach the database."""
    subject, body, reply = canary("subject"), canary("body"), canary("reply")
    canaries = (subject, body, reply)
    seen: set[str] = set()

    def fail_first(received: Received) -> tuple[int, dict[str, str]]:
        first = received.webhook_id not in seen
        seen.add(received.webhook_id)
        return (500, {}) if first else (200, {})

    receiver.respond = fail_first
    caplog.set_level(logging.DEBUG)
    with capture_logs() as logs:  # raw events: before the allow-list could drop anything
        created = await register(client, portals, receiver.url)
        endpoint_id = created["endpoint"]["id"]
        await consent(client, portals)
        made = await thread(client, portals, message=body, subject=subject)
        sent = await client.post(f"/v1/threads/{made['id']}/messages", json={"body": reply}, headers=patient(portals))
        assert sent.status == 201
        await client.post(f"/v1/threads/{made['id']}/messages", json={"body": reply}, headers=physician(portals))
        items = await wait_for_delivery(
            client,
            portals,
            endpoint_id,
            lambda items: len(items) == 3 and all(i["status"] == "succeeded" for i in items),
        )
        views = [
            await admin_get(client, portals, f"/v1/admin/webhook-endpoints/{endpoint_id}/deliveries/{i['id']}")
            for i in items
        ]
    assert all(v["attempts"] == 2 and len(v["attempt_log"]) == 2 for v in views)
    assert [e for e in logs if e.get("event") == "webhook.attempt"], "the worker's log lines were captured"

    texts = [repr(logs), caplog.text, json.dumps(items), json.dumps(views)]
    texts += [json.dumps(r.headers) + r.body.decode() for r in receiver.received]
    conn = await asyncpg.connect(database.owner)
    try:
        texts += [r["row"] for r in await conn.fetch("SELECT row_to_json(o)::text AS row FROM webhook_outbox o")]
        texts += [r["row"] for r in await conn.fetch("SELECT row_to_json(a)::text AS row FROM webhook_attempts a")]
    finally:
        await conn.close()
    assert len(receiver.received) == 6
    assert not [c for c in canaries for t in texts if c in t]

    dump = await asyncio.to_thread(
        subprocess.run,
        [str(find_pg_bindir() / "pg_dump"), "--dbname", database.owner, "--data-only", "--table=webhook_*"],
        capture_output=True,
        check=True,
        timeout=120,
    )
    assert b"COPY public.webhook_attempts" in dump.stdout
    for needle in (*canaries, RECEIVER_BODY):
        assert needle.encode() not in dump.stdout
