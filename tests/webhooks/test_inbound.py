"""Physicians' replies through `POST /v1/inbound/{endpoint_id}/replies`, signed as any Standard Webhooks
sender would sign them: with the `standardwebhooks` PyPI package, an implementation independent of ours.

Each test registers an endpoint through the admin API, gets the patient's consent and a thread through the
portal API, then posts replies the way a physician's in-basket would, and looks at what a user would see:
the status and problem code, the thread's messages as the patient reads them, the audit trail, and what
the other participant's own system receives.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from standardwebhooks import Webhook

from service.domain.audit import decode_entry
from service.settings import Settings
from tests.api.messaging_helpers import consent, patient, thread
from tests.api.webhook_helpers import ADMIN, Receiver, register
from tests.conftest import Dsns, Portals
from tests.support import blocked_by

REPLY = "Yes, take it with food."
# The events of the request that sent X-Request-Id $1 (kept as the `client_request_id` detail).
AUDIT_ROWS = """
    SELECT action, outcome, actor, tenant_id, issuer, resource_id, details, entry
    FROM audit_outbox WHERE details->>'client_request_id' = $1
    UNION ALL
    SELECT action, outcome, actor, tenant_id, issuer, resource_id, details, entry
    FROM audit_leaves WHERE details->>'client_request_id' = $1
"""


@dataclass
class Conversation:
    endpoint_id: str
    inbound_secret: str
    thread_id: str
    first_message: str
    consents: dict[str, str]  # grantee -> Patient/1's messaging consent
    outbound_secret: str  # what the endpoint's receiver verifies our notifications with


async def converse(
    client: Any,
    portals: Portals,
    url: str,
    *,
    subscriber: str = "Practitioner/7",
    participants: list[str] | None = None,
) -> Conversation:
    """An endpoint for `subscriber`, Patient/1's consent for every participant, and their thread."""
    participants = participants or [subscriber]
    created = await register(client, portals, url, subscriber=subscriber)
    consents = {grantee: (await consent(client, portals, grantee=grantee))["id"] for grantee in participants}
    made = await thread(client, portals, participants=participants, message="Can I take ibuprofen with it?")
    secrets = created["secrets"]
    return Conversation(
        created["endpoint"]["id"],
        secrets["inbound_secret"],
        made["id"],
        made["message"]["id"],
        consents,
        secrets["outbound_secret"],
    )


def reply_body(c: Conversation, text: str = REPLY, sender: str = "Practitioner/7", **extra: Any) -> bytes:
    document = {"thread_id": c.thread_id, "in_reply_to": c.first_message, "body": text, "sender": sender, **extra}
    return json.dumps(document).encode()


def signed(
    secret: str, body: bytes, *, msg_id: str | None = None, at: datetime | None = None, **extra: str
) -> dict[str, str]:
    """The headers a Standard Webhooks sender sends, signed by the reference library."""
    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    at = at or datetime.now(UTC)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, at, body.decode()),
        "Content-Type": "application/json",
        **extra,
    }


async def post_reply(client: Any, endpoint_id: str, body: Any, headers: dict[str, str]) -> tuple[int, Any]:
    response = await client.post(f"/v1/inbound/{endpoint_id}/replies", data=body, headers=headers)
    text = await response.text()
    return response.status, json.loads(text) if text else None


async def messages(client: Any, portals: Portals, thread_id: str) -> list[dict[str, Any]]:
    """The thread as the patient reads it."""
    response = await client.get(f"/v1/threads/{thread_id}/messages", headers=patient(portals))
    assert response.status == 200, await response.text()
    items: list[dict[str, Any]] = (await response.json())["items"]
    return items


async def audit_events(database: Dsns, request_id: str) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(database.owner)
    try:
        rows = await conn.fetch(AUDIT_ROWS, request_id)
    finally:
        await conn.close()
    return [{**dict(r), "details": json.loads(r["details"])} for r in rows]


async def acme_id(database: Dsns) -> uuid.UUID:
    conn = await asyncpg.connect(database.owner)
    try:
        tenant: uuid.UUID = await conn.fetchval("SELECT id FROM tenants WHERE slug = 'acme'")
    finally:
        await conn.close()
    return tenant


async def inbound_keys(database: Dsns, endpoint_id: str) -> list[str]:
    """The endpoint's inbound key ids, oldest first (the admin API never shows them)."""
    conn = await asyncpg.connect(database.owner)
    try:
        rows = await conn.fetch(
            "SELECT id FROM webhook_endpoint_keys WHERE endpoint_id = $1 AND purpose = 'inbound' ORDER BY created_at",
            uuid.UUID(endpoint_id),
        )
    finally:
        await conn.close()
    return [str(r["id"]) for r in rows]


def request_id() -> str:
    return f"inbound-{uuid.uuid4().hex}"


# -- accepted ------------------------------------------------------------------------------------------


async def test_a_signed_reply_becomes_a_message_the_patient_reads(client, portals: Portals, receiver: Receiver) -> None:
    c = await converse(client, portals, receiver.url)
    body = reply_body(c)

    status, out = await post_reply(client, c.endpoint_id, body, signed(c.inbound_secret, body))

    assert status == 201, out
    assert (out["thread_id"], out["seq"], out["replayed"]) == (c.thread_id, 2, False)
    items = await messages(client, portals, c.thread_id)
    assert [(m["id"], m["sender"], m["body"], m["in_reply_to"]) for m in items[1:]] == [
        (out["message_id"], "Practitioner/7", REPLY, c.first_message)
    ]


@pytest.mark.parametrize("age", [timedelta(minutes=-4), timedelta(minutes=4)], ids=["4-min-old", "4-min-ahead"])
async def test_a_timestamp_within_five_minutes_is_accepted(
    client, portals: Portals, receiver: Receiver, age: timedelta
) -> None:
    c = await converse(client, portals, receiver.url)
    body = reply_body(c)

    status, out = await post_reply(
        client, c.endpoint_id, body, signed(c.inbound_secret, body, at=datetime.now(UTC) + age)
    )

    assert status == 201, out


# -- refused: signature, time, headers ------------------------------------------------------------------


def tamper_body(secret: str, body: bytes) -> tuple[bytes, dict[str, str]]:
    return body.replace(REPLY.encode(), b"No, never take it."), signed(secret, body)


def tamper_id(secret: str, body: bytes) -> tuple[bytes, dict[str, str]]:
    return body, {**signed(secret, body, msg_id="msg_signed"), "webhook-id": "msg_sent"}


def tamper_timestamp(secret: str, body: bytes) -> tuple[bytes, dict[str, str]]:
    headers = signed(secret, body)
    return body, {**headers, "webhook-timestamp": str(int(headers["webhook-timestamp"]) - 1)}


def wrong_secret(secret: str, body: bytes) -> tuple[bytes, dict[str, str]]:
    return body, signed("whsec_" + "A" * 43 + "=", body)


def stale(secret: str, body: bytes) -> tuple[bytes, dict[str, str]]:
    return body, signed(secret, body, at=datetime.now(UTC) - timedelta(minutes=6))


def future(secret: str, body: bytes) -> tuple[bytes, dict[str, str]]:
    return body, signed(secret, body, at=datetime.now(UTC) + timedelta(minutes=6))


@pytest.mark.parametrize("forge", [tamper_body, tamper_id, tamper_timestamp, wrong_secret, stale, future])
async def test_a_reply_that_does_not_verify_is_401_and_writes_nothing(
    client, portals: Portals, receiver: Receiver, database: Dsns, forge
) -> None:
    c = await converse(client, portals, receiver.url)
    body, headers = forge(c.inbound_secret, reply_body(c))
    rid = request_id()

    status, out = await post_reply(client, c.endpoint_id, body, {**headers, "X-Request-Id": rid})

    assert status == 401, out
    assert out["code"] == "webhook-signature-invalid"
    assert [m["id"] for m in await messages(client, portals, c.thread_id)] == [c.first_message]
    denied = [e for e in await audit_events(database, rid) if e["action"] == "auth:denied"]
    assert len(denied) == 1, denied
    assert denied[0]["outcome"] == "denied"
    assert denied[0]["issuer"] == f"urn:bedside:webhook:{c.endpoint_id}"
    assert denied[0]["tenant_id"] == await acme_id(database)  # the endpoint's tenant's event


async def test_a_reply_signed_with_the_outbound_secret_is_401(
    client, portals: Portals, receiver: Receiver, database: Dsns
) -> None:
    # The outbound secret verifies our notifications at the receiver: holding it must not let anyone reply.
    c = await converse(client, portals, receiver.url)
    body = reply_body(c)
    rid = request_id()

    status, out = await post_reply(
        client, c.endpoint_id, body, {**signed(c.outbound_secret, body), "X-Request-Id": rid}
    )

    assert status == 401, out
    assert out["code"] == "webhook-signature-invalid"
    assert [m["id"] for m in await messages(client, portals, c.thread_id)] == [c.first_message]
    # Refused as a bad signature, at the signature check: not found valid and then turned away later.
    denied = await audit_events(database, rid)
    assert [(e["action"], e["details"]["reason"]) for e in denied] == [("auth:denied", "webhook-bad-signature")]


@pytest.mark.parametrize(
    "forge",
    [
        wrong_secret,
        stale,
        lambda secret, body: (body, signed(secret, body, msg_id="msg.with.dot")),
        lambda secret, body: (body, {k: v for k, v in signed(secret, body).items() if k != "webhook-signature"}),
    ],
    ids=["wrong-signature", "stale", "malformed-id", "no-signature"],
)
async def test_an_unknown_endpoint_answers_as_a_known_one_would(
    client, portals: Portals, receiver: Receiver, forge
) -> None:
    c = await converse(client, portals, receiver.url)
    body, headers = forge(c.inbound_secret, reply_body(c))

    unknown = await post_reply(client, str(uuid.uuid4()), body, headers)
    known = await post_reply(client, c.endpoint_id, body, headers)

    assert unknown[0] == known[0]
    assert unknown[0] in (400, 401)
    assert {k: v for k, v in unknown[1].items() if k != "request_id"} == {
        k: v for k, v in known[1].items() if k != "request_id"
    }


async def test_a_deleted_endpoints_secret_no_longer_works(client, portals: Portals, receiver: Receiver) -> None:
    c = await converse(client, portals, receiver.url)
    deleted = await client.delete(f"/v1/admin/webhook-endpoints/{c.endpoint_id}", headers=portals.acme.auth(**ADMIN))
    assert deleted.status == 204
    body = reply_body(c)

    status, out = await post_reply(client, c.endpoint_id, body, signed(c.inbound_secret, body))

    assert status == 401, out
    assert len(await messages(client, portals, c.thread_id)) == 1


async def test_a_disabled_endpoint_refuses_signed_replies_as_an_unknown_endpoint_would(
    client, portals: Portals, receiver: Receiver, database: Dsns
) -> None:
    c = await converse(client, portals, receiver.url)
    admin = portals.acme.auth(**ADMIN)
    disabled = await client.post(f"/v1/admin/webhook-endpoints/{c.endpoint_id}/disable", headers=admin)
    assert disabled.status == 200, await disabled.text()
    body, rid = reply_body(c), request_id()
    headers = signed(c.inbound_secret, body)

    status, out = await post_reply(client, c.endpoint_id, body, {**headers, "X-Request-Id": rid})
    unknown = await post_reply(client, str(uuid.uuid4()), body, headers)

    assert (status, unknown[0]) == (401, 401), out
    assert {k: v for k, v in out.items() if k != "request_id"} == {
        k: v for k, v in unknown[1].items() if k != "request_id"
    }
    assert [m["id"] for m in await messages(client, portals, c.thread_id)] == [c.first_message]
    # Audited as the endpoint's tenant's refusal, saying why, and which of its secrets signed the reply.
    [denied] = [e for e in await audit_events(database, rid) if e["action"] == "auth:denied"]
    assert (denied["outcome"], denied["details"]["reason"]) == ("denied", "endpoint-disabled")
    assert (denied["tenant_id"], denied["issuer"]) == (await acme_id(database), f"urn:bedside:webhook:{c.endpoint_id}")
    assert decode_entry(bytes(denied["entry"])).get("key_id") == (await inbound_keys(database, c.endpoint_id))[0]

    # Enabled again, it takes the same reply (the refusal wrote no receipt: the webhook-id is still free).
    enabled = await client.post(f"/v1/admin/webhook-endpoints/{c.endpoint_id}/enable", headers=admin)
    assert enabled.status == 200, await enabled.text()
    status, out = await post_reply(
        client, c.endpoint_id, body, signed(c.inbound_secret, body, msg_id=headers["webhook-id"])
    )
    assert status == 201, out


async def test_a_reply_meeting_a_disable_in_progress_waits_for_it_and_is_refused(
    client, portals: Portals, receiver: Receiver, database: Dsns
) -> None:
    # The reply's signature is checked while the endpoint is enabled; an operator's disable, running
    # meanwhile, commits before the reply is written. The reply must not land after the disable.
    c = await converse(client, portals, receiver.url)
    body, rid = reply_body(c), request_id()
    owner = await asyncpg.connect(database.owner)
    try:
        disabling = owner.transaction()
        await disabling.start()
        await owner.execute(
            "UPDATE webhook_endpoints SET disabled_at = now(), disabled_reason = 'admin' WHERE id = $1",
            uuid.UUID(c.endpoint_id),
        )
        reply = asyncio.ensure_future(
            post_reply(client, c.endpoint_id, body, {**signed(c.inbound_secret, body), "X-Request-Id": rid})
        )
        waiting = asyncio.ensure_future(blocked_by(owner, await owner.fetchval("SELECT pg_backend_pid()")))
        await asyncio.wait([reply, waiting], return_when=asyncio.FIRST_COMPLETED)  # a reply that does not wait is done
        waiting.cancel()
        await disabling.commit()
        status, out = await reply
    finally:
        await owner.close()

    assert status == 401, out
    assert [m["id"] for m in await messages(client, portals, c.thread_id)] == [c.first_message]
    [denied] = [e for e in await audit_events(database, rid) if e["action"] == "auth:denied"]
    assert denied["details"]["reason"] == "endpoint-disabled"


def without(name: str) -> Any:
    return lambda h: {k: v for k, v in h.items() if k != name}


@pytest.mark.parametrize(
    "change",
    [
        lambda h: {**h, "webhook-id": "msg.with.dots"},
        lambda h: {**h, "webhook-id": "m" * 257},
        lambda h: {**h, "webhook-timestamp": "+" + h["webhook-timestamp"]},
        without("webhook-id"),
        without("webhook-timestamp"),
        without("webhook-signature"),
        lambda h: {"Content-Type": "application/json"},
    ],
    ids=["id-with-dot", "id-257-chars", "timestamp-with-sign", "no-id", "no-timestamp", "no-signature", "no-headers"],
)
async def test_malformed_webhook_headers_are_400(client, portals: Portals, receiver: Receiver, change) -> None:
    c = await converse(client, portals, receiver.url)
    body = reply_body(c)
    # Signed as sent where it can be: the refusal must come from the header's form, not the signature.
    headers = change(signed(c.inbound_secret, body))
    if "." in headers.get("webhook-id", "") or len(headers.get("webhook-id", "")) > 256:
        headers = signed(c.inbound_secret, body, msg_id=headers["webhook-id"])

    status, out = await post_reply(client, c.endpoint_id, body, headers)

    assert status == 400, out
    assert len(await messages(client, portals, c.thread_id)) == 1


# -- idempotency -------------------------------------------------------------------------------------


async def test_the_same_delivery_again_answers_with_the_first_message(
    client, portals: Portals, receiver: Receiver
) -> None:
    c = await converse(client, portals, receiver.url)
    body = reply_body(c)
    headers = signed(c.inbound_secret, body)
    first = await post_reply(client, c.endpoint_id, body, headers)
    # A retry of the sender re-signs with a new timestamp; the webhook-id is what stays.
    retried_headers = signed(c.inbound_secret, body, msg_id=headers["webhook-id"])

    again = await post_reply(client, c.endpoint_id, body, headers)
    retried = await post_reply(client, c.endpoint_id, body, retried_headers)

    assert (first[0], again[0], retried[0]) == (201, 200, 200)
    assert again[1]["message_id"] == retried[1]["message_id"] == first[1]["message_id"]
    assert (again[1]["replayed"], again[1]["thread_id"]) == (True, c.thread_id)
    assert [m["body"] for m in await messages(client, portals, c.thread_id)].count(REPLY) == 1


async def test_the_receipt_keeps_a_keyed_fingerprint_that_confirms_no_guess_of_the_reply(
    client, portals: Portals, receiver: Receiver, database: Dsns
) -> None:
    c = await converse(client, portals, receiver.url)
    body = reply_body(c)
    headers = signed(c.inbound_secret, body)
    assert (await post_reply(client, c.endpoint_id, body, headers))[0] == 201

    receipt = "SELECT body_hash FROM inbound_receipts WHERE webhook_id = $1"
    conn = await asyncpg.connect(database.owner)
    try:
        stored = bytes(await conn.fetchval(receipt, headers["webhook-id"]))
        # The thread, the message replied to and the sender are all in the database beside it: a plain
        # digest of the body would confirm a guess of the reply's text. This one is keyed.
        assert (len(stored), stored[0]) == (33, 1)
        assert not {stored, stored[1:]} & {hashlib.sha256(body).digest(), hashlib.sha512(body).digest()}

        # A receipt from before fingerprints were keyed (scrubbed by migration 0009) still answers a
        # redelivery with its message rather than take the reply twice.
        await conn.execute(
            "UPDATE inbound_receipts SET body_hash = '\\x00' WHERE webhook_id = $1", headers["webhook-id"]
        )
    finally:
        await conn.close()
    status, out = await post_reply(
        client, c.endpoint_id, body, signed(c.inbound_secret, body, msg_id=headers["webhook-id"])
    )
    assert (status, out["replayed"]) == (200, True)
    assert [m["body"] for m in await messages(client, portals, c.thread_id)].count(REPLY) == 1


async def test_the_same_webhook_id_with_another_body_is_409(client, portals: Portals, receiver: Receiver) -> None:
    c = await converse(client, portals, receiver.url)
    body, other = reply_body(c), reply_body(c, text="Actually, no.")
    headers = signed(c.inbound_secret, body)
    assert (await post_reply(client, c.endpoint_id, body, headers))[0] == 201

    status, out = await post_reply(
        client, c.endpoint_id, other, signed(c.inbound_secret, other, msg_id=headers["webhook-id"])
    )

    assert status == 409, out
    assert [m["body"] for m in await messages(client, portals, c.thread_id)][1:] == [REPLY]


async def test_twenty_concurrent_identical_deliveries_make_one_message(
    client, portals: Portals, receiver: Receiver
) -> None:
    c = await converse(client, portals, receiver.url)
    body = reply_body(c)
    headers = signed(c.inbound_secret, body)

    answers = await asyncio.gather(*(post_reply(client, c.endpoint_id, body, headers) for _ in range(20)))

    assert sorted(status for status, _ in answers) == [200] * 19 + [201], answers
    assert len({out["message_id"] for _, out in answers}) == 1
    replies = [m for m in await messages(client, portals, c.thread_id) if m["body"] == REPLY]
    assert [m["id"] for m in replies] == [answers[0][1]["message_id"]]


# -- who may reply -------------------------------------------------------------------------------------


async def test_a_sender_who_is_not_the_subscriber_is_403_and_nothing_is_written(
    client, portals: Portals, receiver: Receiver
) -> None:
    c = await converse(client, portals, receiver.url)
    forged = reply_body(c, sender="Practitioner/99")
    headers = signed(c.inbound_secret, forged)

    status, out = await post_reply(client, c.endpoint_id, forged, headers)

    assert status == 403, out
    assert len(await messages(client, portals, c.thread_id)) == 1
    # Nothing was written, not even the receipt: the same webhook-id is still free for the real reply.
    body = reply_body(c)
    retry = await post_reply(client, c.endpoint_id, body, signed(c.inbound_secret, body, msg_id=headers["webhook-id"]))
    assert retry[0] == 201, retry


async def test_a_current_member_of_the_subscriber_care_team_may_reply(
    client, portals: Portals, receiver: Receiver
) -> None:
    admin = portals.acme.auth(**ADMIN)
    team = {"team": "CareTeam/cardio", "members": ["Practitioner/7", "Practitioner/8"]}
    assert (await client.post("/v1/admin/care-teams", json=team, headers=admin)).status == 201
    c = await converse(client, portals, receiver.url, subscriber="CareTeam/cardio")
    body = reply_body(c, sender="Practitioner/8")

    status, out = await post_reply(client, c.endpoint_id, body, signed(c.inbound_secret, body))

    assert status == 201, out
    assert (await messages(client, portals, c.thread_id))[-1]["sender"] == "Practitioner/8"

    # Once Practitioner/8 has left the team, the team's system can no longer speak for them.
    left = await client.put("/v1/admin/care-teams/cardio/members", json={"members": ["Practitioner/7"]}, headers=admin)
    assert left.status == 200
    later = reply_body(c, text="One more thing.", sender="Practitioner/8")
    status, out = await post_reply(client, c.endpoint_id, later, signed(c.inbound_secret, later))
    assert status == 403, out
    assert len(await messages(client, portals, c.thread_id)) == 2


async def test_a_care_teams_endpoint_reaches_only_the_teams_threads(
    client, portals: Portals, receiver: Receiver, database: Dsns
) -> None:
    admin = portals.acme.auth(**ADMIN)
    team = {"team": "CareTeam/cardio", "members": ["Practitioner/7"]}
    assert (await client.post("/v1/admin/care-teams", json=team, headers=admin)).status == 201
    c = await converse(client, portals, receiver.url, subscriber="CareTeam/cardio")
    # Practitioner/7 also has a thread of their own with the patient, which the team is no part of.
    await consent(client, portals, grantee="Practitioner/7")
    own = await thread(client, portals, participants=["Practitioner/7"], message="Just for you, doctor.")
    body = reply_body(c, sender="Practitioner/7", thread_id=own["id"], in_reply_to=None)
    headers = signed(c.inbound_secret, body)

    status, out = await post_reply(client, c.endpoint_id, body, headers)

    assert status == 403, out
    assert len(await messages(client, portals, own["id"])) == 1
    conn = await asyncpg.connect(database.owner)
    try:
        reasons = await conn.fetch(
            "SELECT details->>'reason' AS reason FROM audit_outbox WHERE action = 'access:denied' "
            "AND resource_id = $1 UNION ALL SELECT details->>'reason' FROM audit_leaves "
            "WHERE action = 'access:denied' AND resource_id = $1",
            own["id"],
        )
    finally:
        await conn.close()
    assert [r["reason"] for r in reasons] == ["endpoint-not-participant"]
    # Through the team's own thread, the same member still replies.
    ok = reply_body(c, sender="Practitioner/7")
    assert (await post_reply(client, c.endpoint_id, ok, signed(c.inbound_secret, ok)))[0] == 201


async def test_a_revoked_consent_refuses_the_reply(client, portals: Portals, receiver: Receiver) -> None:
    c = await converse(client, portals, receiver.url)
    revoked = await client.post(
        f"/v1/consents/{c.consents['Practitioner/7']}/revoke",
        json={"reason": "patient-request"},
        headers=patient(portals),
    )
    assert revoked.status == 200, await revoked.text()
    body = reply_body(c)

    status, out = await post_reply(client, c.endpoint_id, body, signed(c.inbound_secret, body))

    assert status == 403, out
    assert out["code"] == "consent-required"
    assert len(await messages(client, portals, c.thread_id)) == 1


# -- the body ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_body_over_the_cap_is_413(
    client, portals: Portals, receiver: Receiver, settings: Settings, chunked: bool
) -> None:
    c = await converse(client, portals, receiver.url)
    body = reply_body(c, text="x" * settings.inbound_max_body_bytes)
    headers = signed(c.inbound_secret, body)

    async def stream() -> Any:
        for start in range(0, len(body), 16 * 1024):
            yield body[start : start + 16 * 1024]

    status, out = await post_reply(client, c.endpoint_id, stream() if chunked else body, headers)

    assert status == 413, out
    assert len(await messages(client, portals, c.thread_id)) == 1


async def test_signed_bytes_that_are_not_json_are_400(client, portals: Portals, receiver: Receiver) -> None:
    c = await converse(client, portals, receiver.url)
    body = reply_body(c)[:-1]

    status, out = await post_reply(client, c.endpoint_id, body, signed(c.inbound_secret, body))

    assert status == 400, out
    assert len(await messages(client, portals, c.thread_id)) == 1


@pytest.mark.parametrize(
    "shape",
    [
        lambda c: {"body": REPLY, "sender": "Practitioner/7"},
        lambda c: {"thread_id": "not-a-uuid", "body": REPLY, "sender": "Practitioner/7"},
        lambda c: {"thread_id": c.thread_id, "body": "", "sender": "Practitioner/7"},
        lambda c: {"thread_id": c.thread_id, "body": REPLY, "sender": "Patient/1"},
        lambda c: {"thread_id": c.thread_id, "body": REPLY, "sender": "Practitioner/7", "priority": "urgent"},
        lambda c: [c.thread_id, REPLY],
    ],
    ids=["no-thread", "thread-not-uuid", "empty-body", "sender-not-practitioner", "unknown-field", "array"],
)
async def test_signed_json_of_the_wrong_shape_is_422(client, portals: Portals, receiver: Receiver, shape) -> None:
    c = await converse(client, portals, receiver.url)
    body = json.dumps(shape(c)).encode()

    status, out = await post_reply(client, c.endpoint_id, body, signed(c.inbound_secret, body))

    assert status == 422, out
    assert len(await messages(client, portals, c.thread_id)) == 1


# -- rotation and audit --------------------------------------------------------------------------------


async def test_during_a_rotation_both_secrets_verify_and_the_audit_names_which(
    client, portals: Portals, receiver: Receiver, database: Dsns
) -> None:
    c = await converse(client, portals, receiver.url)
    rotated = await client.post(
        f"/v1/admin/webhook-endpoints/{c.endpoint_id}/rotate",
        json={"purpose": "inbound"},
        headers=portals.acme.auth(**ADMIN),
    )
    assert rotated.status == 201, await rotated.text()
    new_secret = (await rotated.json())["inbound_secret"]
    assert new_secret.startswith("whsec_")
    assert new_secret != c.inbound_secret
    old_key, new_key = await inbound_keys(database, c.endpoint_id)

    sent = []
    for secret, text in ((c.inbound_secret, "signed with the old secret"), (new_secret, "signed with the new one")):
        body, rid = reply_body(c, text=text), request_id()
        headers = {**signed(secret, body), "X-Request-Id": rid}
        status, out = await post_reply(client, c.endpoint_id, body, headers)
        assert status == 201, out
        sent.append((rid, headers["webhook-id"], out["message_id"]))

    texts = [m["body"] for m in await messages(client, portals, c.thread_id)]
    assert texts[1:] == ["signed with the old secret", "signed with the new one"]
    for (rid, webhook_id, message_id), key_id in zip(sent, (old_key, new_key), strict=True):
        (send,) = [e for e in await audit_events(database, rid) if e["action"] == "message:send"]
        assert (send["outcome"], send["actor"]) == ("success", "Practitioner/7")
        assert send["resource_id"] == message_id
        assert {k: send["details"].get(k) for k in ("via", "endpoint_id", "key_id", "webhook_id")} == {
            "via": "webhook",
            "endpoint_id": c.endpoint_id,
            "key_id": key_id,
            "webhook_id": webhook_id,
        }, send
        assert send["details"]["thread_id"] == c.thread_id
        assert (
            decode_entry(bytes(send["entry"])).get("key_id") == key_id
        )  # the secret that verified it, as a token's key would be


class TestTheOldSecretEndsWithTheOverlap:
    @pytest.fixture
    def settings(self, settings: Settings) -> Settings:
        return settings.model_copy(update={"webhook_secret_overlap_seconds": 1.0})

    async def test_after_the_overlap_only_the_new_secret_verifies(
        self, client, portals: Portals, receiver: Receiver
    ) -> None:
        c = await converse(client, portals, receiver.url)
        rotated = await client.post(
            f"/v1/admin/webhook-endpoints/{c.endpoint_id}/rotate",
            json={"purpose": "inbound"},
            headers=portals.acme.auth(**ADMIN),
        )
        new_secret = (await rotated.json())["inbound_secret"]
        await asyncio.sleep(1.5)

        old_body, new_body = reply_body(c, text="old"), reply_body(c, text="new")
        old = await post_reply(client, c.endpoint_id, old_body, signed(c.inbound_secret, old_body))
        new = await post_reply(client, c.endpoint_id, new_body, signed(new_secret, new_body))

        assert (old[0], new[0]) == (401, 201), (old, new)
        assert [m["body"] for m in await messages(client, portals, c.thread_id)][1:] == ["new"]


# -- the other side hears of it ------------------------------------------------------------------------


async def test_a_reply_notifies_the_other_participants_system(
    client, portals: Portals, receiver: Receiver, database: Dsns
) -> None:
    nurse_station = Receiver()
    await nurse_station.start()
    try:
        nurse = await register(client, portals, nurse_station.url, subscriber="Practitioner/8")
        c = await converse(client, portals, receiver.url, participants=["Practitioner/7", "Practitioner/8"])
        body = reply_body(c, text="canary-reply-text")

        status, out = await post_reply(client, c.endpoint_id, body, signed(c.inbound_secret, body))
        assert status == 201, out

        def notified(got: list[Any]) -> bool:
            return any(
                r.json["type"] == "message.created" and r.json["data"].get("message_id") == out["message_id"]
                for r in got
            )

        await nurse_station.wait_for(notified)
    finally:
        await nurse_station.stop()
    (received,) = [r for r in nurse_station.received if r.json["data"].get("message_id") == out["message_id"]]
    Webhook(nurse["secrets"]["outbound_secret"]).verify(received.body, received.headers)
    assert received.json["data"]["thread_id"] == c.thread_id
    assert b"canary-reply-text" not in received.body
    # The replying physician's own system is not told about its own reply.
    deliveries = await (
        await client.get(
            f"/v1/admin/webhook-endpoints/{c.endpoint_id}/deliveries?limit=200", headers=portals.acme.auth(**ADMIN)
        )
    ).json()
    assert [d for d in deliveries["items"] if d["data"].get("message_id") == out["message_id"]] == []
