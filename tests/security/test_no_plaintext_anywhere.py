"""Planted canaries in a subject, a body, a break-glass reason, an attachment's file name and its content
never leave their ciphertext: not in a `pg_dump` of the whole database, logs, metrics, error bodies, audit
entries, webhook outbox payloads, delivery attempts or what the receiver was sent; neither as they were
written nor in an encoding a leak could take (`leak_forms`). Nor do a webhook endpoint's secrets and the
credential in its URL, which are shown once (the secrets) or to admins only (the URL), and otherwise kept
sealed; nor what the receiver answered. A participant still gets the attachment back, name and all."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, quote_plus, unquote

import asyncpg
import pytest
from structlog.testing import capture_logs

from service.embedded import find_pg_bindir
from service.logs import redacting_processors
from service.settings import Settings
from tests.api.messaging_helpers import ATTACHMENTS_URL, consent, patient, physician, thread, upload
from tests.api.webhook_helpers import Received, Receiver, register, wait_for_delivery
from tests.conftest import Dsns, Portals, Services
from tests.support import AUDIT_EVENTS, as_owner, canary

RECEIVER_BODY = "receiver body that must never be stored"  # what every answer of `Receiver` says
MAX_ATTACHMENT = 128 * 1024  # small, so that an upload past the limit is cheap


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """A receiver on loopback, retries soon enough to see a failed attempt and a good one, and a small
    attachment limit."""
    return settings.model_copy(
        update={
            "max_attachment_bytes": MAX_ATTACHMENT,
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


def leak_forms(planted: str) -> set[bytes]:
    """`planted` as a leak could carry it: UTF-8; percent-encoded (a URL, a Content-Disposition); JSON's
    `\\u` escapes; hex (a bytea in a pg_dump, a digest-like log); base64 and base64url, each at the three
    offsets it could start at within a longer encoded value (only the characters that `planted` alone
    decides)."""
    raw = planted.encode()
    forms = {raw, quote(planted, safe="").encode(), quote_plus(planted).encode(), json.dumps(planted)[1:-1].encode()}
    forms |= {raw.hex().encode(), raw.hex().upper().encode()}
    for offset in range(3):
        for b64encode in (base64.b64encode, base64.urlsafe_b64encode):
            encoded = b64encode(bytes(offset) + raw)
            forms.add(encoded[4 if offset else 0 : (offset + len(raw)) // 3 * 4])
    return forms


def leaks(planted: Iterable[str], *places: str | bytes) -> list[str]:
    """What of `planted` shows up in any of `places`, in any of its `leak_forms`."""
    blobs = [place.encode() if isinstance(place, str) else place for place in places]
    return [p for p in planted if any(form in blob for form in leak_forms(p) for blob in blobs)]


async def settle_audit(client: Any) -> None:
    """Let the sequencer integrate what the requests recorded."""
    for _ in range(100):
        if not (await (await client.get("/readyz")).json())["audit_backlog"]:
            return
        await asyncio.sleep(0.05)


@dataclass(frozen=True)
class Rows:
    """Every webhook outbox row, delivery attempt and audit event (waiting or integrated), each row's
    columns as the owner reads them, side by side."""

    outbox: list[bytes]
    attempts: list[bytes]
    audit: list[bytes]


async def read_rows(owner_dsn: str) -> Rows:
    async def read(conn: asyncpg.Connection) -> Rows:
        async def rows(query: str) -> list[bytes]:
            return [
                b" ".join(v if isinstance(v, bytes) else str(v).encode() for v in r.values())
                for r in await conn.fetch(query)
            ]

        return Rows(
            outbox=await rows("SELECT * FROM webhook_outbox"),
            attempts=await rows("SELECT * FROM webhook_attempts"),
            audit=await rows(f"SELECT * FROM {AUDIT_EVENTS}"),  # noqa: S608
        )

    rows: Rows = await as_owner(owner_dsn, read)
    return rows


async def dump_all(owner_dsn: str) -> bytes:
    """Every row of every table, as `pg_dump` writes it."""
    dump = await asyncio.to_thread(
        subprocess.run,
        [str(find_pg_bindir() / "pg_dump"), "--dbname", owner_dsn, "--data-only"],
        capture_output=True,
        check=True,
        timeout=120,
    )
    return dump.stdout


async def test_canaries_never_leave_their_ciphertext(
    client, portals: Portals, database: Dsns, services: Services, receiver: Receiver, caplog: pytest.LogCaptureFixture
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
        await settle_audit(client)
    assert [e.status for e in errors] == [422, 400, 404, 403]

    canaries = (subject, body, reason, bad, token, echoed, *secrets)
    assert not leaks(canaries, *error_bodies)
    assert not leaks(canaries, metrics)
    assert not leaks(canaries, repr(logs), caplog.text)
    # What the receiver was sent: ids, never content.
    assert not leaks(canaries, *(r.body for r in receiver.received), *(repr(r.headers) for r in receiver.received))

    rows = await read_rows(database.owner)
    assert len(rows.outbox) == 2  # thread.created and message.created for Practitioner/7
    assert len(rows.attempts) >= 3
    assert not leaks(canaries, *rows.outbox)
    assert not leaks((*canaries, RECEIVER_BODY), *rows.attempts)
    assert not leaks(canaries, *rows.audit)

    dump = await dump_all(database.owner)
    assert len(dump) > 10_000  # a real dump, with the ciphertext in it
    assert not leaks((*canaries, RECEIVER_BODY), dump)
    for secret in secrets:
        assert not [form for form in stored_forms(secret) if form in dump]


async def test_attachment_canaries_never_leave_their_ciphertext(
    client, portals: Portals, database: Dsns, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    # Spaces and a non-ASCII letter, so that the percent-encoded and JSON-escaped forms differ from the raw.
    text_name, text_canary = canary("nom de fichier é"), canary("text content")
    pdf_name, pdf_canary, body = canary("scan name"), canary("pdf content"), canary("message body")
    text_file, pdf_file = f"Résultats {text_name}.txt", f"{pdf_name}.pdf"
    text = "".join(f"Result {i}: {text_canary} ✓\n" for i in range(1400)).encode()  # two chunks, each with it
    pdf = f"%PDF-1.7\n% {pdf_canary}\n%%EOF\n".encode()
    assert 64 * 1024 < len(text) < MAX_ATTACHMENT < 2 * len(text)

    async def past_the_limit() -> AsyncIterator[bytes]:  # no declared length: refused as it streams
        yield text
        yield text

    with capture_logs(processors=redacting_processors()) as logs:
        # A physician's endpoint, so that the thread and the message carrying the files write outbox rows;
        # the message is sent with an idempotency key, so that what is kept for replays is looked at too.
        endpoint = await register(client, portals, receiver.url, event_types=["message.created", "thread.created"])
        await consent(client, portals)
        thread_id = (await thread(client, portals, message=None))["id"]
        uploads = [
            await upload(client, patient(portals), thread_id, text, "text/plain", text_file),
            await upload(client, physician(portals), thread_id, pdf, "application/pdf", pdf_file),
        ]
        assert [u.status for u in uploads] == [201, 201], [await u.text() for u in uploads]
        text_id, pdf_id = [(await u.json())["id"] for u in uploads]
        sent = await client.post(
            f"/v1/threads/{thread_id}/messages",
            json={"body": body, "attachment_ids": [text_id, pdf_id]},
            headers={**patient(portals), "Idempotency-Key": "results-1"},
        )
        assert sent.status == 201, await sent.text()
        downloads = [
            await client.get(f"{ATTACHMENTS_URL}/{text_id}", headers=physician(portals)),
            await client.get(f"{ATTACHMENTS_URL}/{pdf_id}", headers=patient(portals)),
        ]
        downloaded = [(await d.read(), unquote(d.headers["Content-Disposition"].split("''", 1)[1])) for d in downloads]

        errors = [
            await upload(client, patient(portals), thread_id, text, "image/png", text_file),  # not its type
            await upload(client, patient(portals), thread_id, text, "text/html", text_file),  # not allowed
            await upload(
                client, patient(portals), thread_id, text + text, "text/plain", text_file
            ),  # too large, declared
            await upload(client, patient(portals), thread_id, past_the_limit(), "text/plain", text_file),
            await upload(client, patient(portals), thread_id, text, "text/plain", f"../{text_file}"),
            await upload(client, physician(portals, 99), thread_id, pdf, "application/pdf", pdf_file),
            await upload(client, patient(portals, 2), thread_id, text, "text/plain", text_file),
            await upload(client, {}, thread_id, text, "text/plain", text_file),
            await client.get(f"{ATTACHMENTS_URL}/{text_id}", headers=physician(portals, 99)),
            await client.get(f"{ATTACHMENTS_URL}/{pdf_id}", headers=patient(portals, 2)),
            await client.get(
                f"{ATTACHMENTS_URL}/{text_id}", headers=portals.acme.auth(role="compliance", sub="Practitioner/c1")
            ),
            await client.get(
                f"{ATTACHMENTS_URL}/{pdf_id}", headers=portals.globex.auth(role="patient", sub="Patient/1")
            ),
        ]
        error_bodies = [(await e.text(), repr(e.headers)) for e in errors]
        deliveries = await wait_for_delivery(
            client,
            portals,
            endpoint["endpoint"]["id"],
            lambda items: len(items) == 2 and all(i["status"] == "succeeded" for i in items),
        )
        metrics = await (await client.get("/metrics")).text()
        await settle_audit(client)
    assert [e.status for e in errors] == [415, 415, 413, 413, 422, 404, 404, 401, 404, 404, 404, 404]
    # Where they belong, they are: the participants get both files back, name and content.
    assert [d.status for d in downloads] == [200, 200]
    assert downloaded == [(text, text_file), (pdf, pdf_file)]
    assert sorted((await sent.json())["attachment_ids"]) == sorted([text_id, pdf_id])

    canaries = (text_name, text_canary, pdf_name, pdf_canary, body)
    assert not leaks(canaries, *(part for pair in error_bodies for part in pair))
    assert not leaks(canaries, metrics)
    assert not leaks(canaries, repr(logs), caplog.text)
    # What the receiver was sent, and what an admin sees of it: ids, never content.
    assert {r.json["type"] for r in receiver.received} == {"thread.created", "message.created"}
    assert not leaks(canaries, *(r.body for r in receiver.received), *(repr(r.headers) for r in receiver.received))
    assert not leaks(canaries, json.dumps(deliveries))

    rows = await read_rows(database.owner)
    assert len(rows.outbox) == 2  # thread.created and message.created for Practitioner/7
    assert len(rows.attempts) >= 2
    assert len(rows.audit) > 5
    assert not leaks(canaries, *rows.outbox)
    assert not leaks(canaries, *rows.attempts)
    assert not leaks(canaries, *rows.audit)

    dump = await dump_all(database.owner)
    assert len(dump) > 2 * len(text)  # a real dump, with the ciphertext in it
    assert not leaks(canaries, dump)
