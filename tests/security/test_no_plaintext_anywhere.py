"""Planted canaries in a subject, a body and a break-glass reason never leave their ciphertext: not in a
`pg_dump` of the whole database, logs, metrics, error bodies, audit entries, webhook outbox payloads or
delivery attempts. Nor do a webhook endpoint's secrets and the credential in its URL, which are shown once
(the secrets) or to admins only (the URL), and otherwise kept sealed; nor what the receiver answered."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import uuid

import asyncpg
import pytest
from structlog.testing import capture_logs

from service.embedded import find_pg_bindir
from service.logs import redacting_processors
from service.settings import Settings
from tests.api.messaging_helpers import consent, patient, physician
from tests.api.webhook_helpers import Received, Receiver, register
from tests.conftest import Portals, Services
from tests.support import canary

RECEIVER_BODY = "receiver body that must never be stored"  # what every answer of `Receiver` says


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """A receiver on loopback, and retries soon enough to see a failed attempt and a good one."""
    return settings.model_copy(
        update={
            "webhook_allow_http_loopback": True,
            "webhook_retry_schedule_seconds": (0.2, 0.3, 0.4),
            "webhook_retry_jitter": 0.0,
            "webhook_poll_interval_seconds": 0.05,
            "webhook_timeout_seconds": 2.0,
            "webhook_lease_seconds": 10.0,
        }
    )


def stored_forms(secret: str) -> list[bytes]:
    """A `whsec_` secret as text, its base64 alone, and its key bytes as pg_dump writes a bytea."""
    encoded = secret.removeprefix("whsec_")
    return [secret.encode(), encoded.encode(), base64.b64decode(encoded).hex().encode()]


async def test_canaries_never_leave_their_ciphertext(
    client, portals: Portals, database, services: Services, receiver: Receiver
) -> None:
    subject, body, reason, bad = canary("subject"), canary("body"), canary("reason"), canary("badfield")
    token, echoed = canary("url-token"), canary("receiver-header")
    answers = iter([500])  # the first attempt fails, so a retry is recorded too; then 200s

    def respond(received: Received) -> tuple[int, dict[str, str]]:
        return next(answers, 200), {"X-Receiver-Says": echoed}

    receiver.respond = respond

    with capture_logs(processors=redacting_processors()) as logs:
        # A physician's endpoint, so sends write outbox payloads and the worker makes attempts.
        created = await register(
            client,
            portals,
            receiver.url.replace("receiver-secret", token),
            event_types=["message.created", "thread.created", "message.recalled"],
        )
        secrets = [created["secrets"]["outbound_secret"], created["secrets"]["inbound_secret"]]
        await consent(client, portals)
        created = await client.post(
            "/v1/threads",
            json={
                "patient": "Patient/1",
                "participants": ["Practitioner/7"],
                "subject": subject,
                "message": {"body": body},
            },
            headers=patient(portals),
        )
        assert created.status == 201
        thread_id = (await created.json())["id"]
        await client.get(f"/v1/threads/{thread_id}/messages", headers=physician(portals))
        await client.get(f"/v1/threads/{thread_id}", headers={**physician(portals, 99), "Break-Glass-Reason": reason})
        errors = [
            await client.post(
                f"/v1/threads/{thread_id}/messages", json={"body": body, bad: bad}, headers=patient(portals)
            ),
            await client.post(
                f"/v1/threads/{thread_id}/messages",
                data=f'{{"body": "{body}"',
                headers={**patient(portals), "Content-Type": "application/json"},
            ),
            await client.post(f"/v1/threads/{uuid.uuid4()}/messages", json={"body": body}, headers=patient(portals)),
            await client.post(
                "/v1/threads",
                json={"patient": "Patient/1", "participants": ["Practitioner/404"], "subject": subject},
                headers=patient(portals),
            ),
        ]
        error_bodies = [await e.text() for e in errors]
        await receiver.wait_for(lambda got: len(got) >= 3)  # a failed attempt and two deliveries
        metrics = await (await client.get("/metrics")).text()
        for _ in range(100):  # let the sequencer integrate what the requests recorded
            if not (await (await client.get("/readyz")).json())["audit_backlog"]:
                break
            await asyncio.sleep(0.05)
    assert [e.status for e in errors] == [422, 400, 404, 403]

    canaries = (subject, body, reason, bad, token, echoed, *secrets)
    for text in (*error_bodies, metrics, repr(logs)):
        assert not [c for c in canaries if c in text]
    for received in receiver.received:  # what the receiver was sent: ids, never content
        assert not [c for c in canaries if c.encode() in received.body]

    owner = await asyncpg.connect(database.owner)
    try:
        outbox = [r["payload"] for r in await owner.fetch("SELECT payload FROM webhook_outbox")]
        attempts = [str(dict(r)) for r in await owner.fetch("SELECT * FROM webhook_attempts")]
        entries = [
            bytes(r["entry"])
            for r in await owner.fetch("SELECT entry FROM audit_leaves UNION ALL SELECT entry FROM audit_outbox")
        ]
    finally:
        await owner.close()
    assert len(outbox) == 2  # thread.created and message.created for Practitioner/7
    assert len(attempts) >= 3
    assert not [c for c in canaries for p in outbox if c in p]
    assert not [c for c in (*canaries, RECEIVER_BODY) for a in attempts if c in a]
    assert not [c for c in canaries for e in entries if c.encode() in e]

    dump = await asyncio.to_thread(
        subprocess.run,
        [str(find_pg_bindir() / "pg_dump"), "--dbname", database.owner, "--data-only"],
        capture_output=True,
        check=True,
        timeout=120,
    )
    assert len(dump.stdout) > 10_000  # a real dump, with the ciphertext in it
    for planted in (*canaries, RECEIVER_BODY):
        assert planted.encode() not in dump.stdout
    for secret in secrets:
        assert not [form for form in stored_forms(secret) if form in dump.stdout]
