"""Planted canaries in a subject, a body and a break-glass reason never leave their ciphertext: not in a
`pg_dump` of the whole database, logs, metrics, error bodies, audit entries or webhook outbox payloads."""

from __future__ import annotations

import asyncio
import subprocess
import uuid

import asyncpg
from structlog.testing import capture_logs

from service.embedded import find_pg_bindir
from service.logs import redacting_processors
from tests.api.messaging_helpers import consent, patient, physician
from tests.conftest import Portals, Services
from tests.support import canary


async def test_canaries_never_leave_their_ciphertext(client, portals: Portals, database, services: Services) -> None:
    subject, body, reason, bad = canary("subject"), canary("body"), canary("reason"), canary("badfield")
    owner = await asyncpg.connect(database.owner)
    try:  # a physician's endpoint, so the notification hook writes outbox payloads too
        tenant_id = await owner.fetchval("SELECT id FROM tenants WHERE slug = 'acme'")
        await owner.execute(
            "INSERT INTO webhook_endpoints (tenant_id, id, subscriber, event_types) VALUES ($1, $2, $3, $4)",
            tenant_id,
            uuid.uuid4(),
            "Practitioner/7",
            ["message.created", "thread.created", "message.recalled"],
        )
    finally:
        await owner.close()

    with capture_logs(processors=redacting_processors()) as logs:
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
        metrics = await (await client.get("/metrics")).text()
        for _ in range(100):  # let the sequencer integrate what the requests recorded
            if not (await (await client.get("/readyz")).json())["audit_backlog"]:
                break
            await asyncio.sleep(0.05)
    assert [e.status for e in errors] == [422, 400, 404, 403]

    canaries = (subject, body, reason, bad)
    for text in (*error_bodies, metrics, repr(logs)):
        assert not [c for c in canaries if c in text]

    owner = await asyncpg.connect(database.owner)
    try:
        outbox = [r["payload"] for r in await owner.fetch("SELECT payload FROM webhook_outbox")]
        entries = [
            bytes(r["entry"])
            for r in await owner.fetch("SELECT entry FROM audit_leaves UNION ALL SELECT entry FROM audit_outbox")
        ]
    finally:
        await owner.close()
    assert len(outbox) == 2  # thread.created and message.created for Practitioner/7
    assert not [c for c in canaries for p in outbox if c in p]
    assert not [c for c in canaries for e in entries if c.encode() in e]

    dump = await asyncio.to_thread(
        subprocess.run,
        [str(find_pg_bindir() / "pg_dump"), "--dbname", database.owner, "--data-only"],
        capture_output=True,
        check=True,
        timeout=120,
    )
    assert len(dump.stdout) > 10_000  # a real dump, with the ciphertext in it
    for planted in canaries:
        assert planted.encode() not in dump.stdout
