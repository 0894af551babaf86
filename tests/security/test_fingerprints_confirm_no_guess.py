"""What is kept with an `Idempotency-Key` confirms nothing about what the request said to someone who holds
the database (a dump, a backup) but not the KEK: the fingerprint is keyed with the tenant's own data key."""

from __future__ import annotations

import hashlib
import json
from uuid import UUID

import asyncpg

from crypto.fingerprint import fingerprint
from service.domain.consents import ConsentRequest, Evidence, EvidenceMethod, Scope
from tests.api.messaging_helpers import PORTAL, consent, patient, thread
from tests.conftest import Portals, Services
from tests.support import as_owner


async def _stored_hashes(owner_dsn: str) -> dict[str, bytes]:
    async def read(conn: asyncpg.Connection) -> dict[str, bytes]:
        return {
            r["key"]: bytes(r["request_hash"])
            for r in await conn.fetch("SELECT key, request_hash FROM idempotency_keys")
        }

    result: dict[str, bytes] = await as_owner(owner_dsn, read)
    return result


def _guesses(*encodings: str) -> set[bytes]:
    """What anyone with the rows could compute from a guess: unkeyed digests of any encoding of it."""
    return {h(e.encode()).digest() for e in encodings for h in (hashlib.sha256, hashlib.sha512, hashlib.sha1)}


async def test_a_guessed_short_message_cannot_be_confirmed_from_the_database(
    client, portals: Portals, services: Services, database
) -> None:
    await consent(client, portals)
    created = await thread(client, portals, message=None)
    thread_id = created["id"]
    sent = await client.post(
        f"/v1/threads/{thread_id}/messages",
        json={"body": "yes"},
        headers={**patient(portals), "Idempotency-Key": "answer-1"},
    )
    assert sent.status == 201, await sent.text()

    stored = (await _stored_hashes(database.owner))["answer-1"]
    request = ["message", thread_id, "yes", [], None]
    canonical = json.dumps(request, separators=(",", ":"))
    # The unkeyed digest this service stored before (of the request's Python repr), and plain digests of
    # the canonical form: none of them is what is kept.
    before = repr(("message", UUID(thread_id), "yes", [], None))
    assert stored not in _guesses(before, canonical)
    assert stored[1:] not in _guesses(before, canonical)
    # It is the HMAC under the tenant's own key, which the database holds only wrapped by the KEK.
    tenant = await services.tenants.get("acme")
    async with services.db.transaction(tenant.id) as tx:
        key = await services.keyring.tenant_key(tx)
    assert stored == fingerprint(key, canonical.encode())

    # And it still does its work: the same request is replayed, another one with the key is refused.
    again = await client.post(
        f"/v1/threads/{thread_id}/messages",
        json={"body": "yes"},
        headers={**patient(portals), "Idempotency-Key": "answer-1"},
    )
    assert (again.status, again.headers.get("Idempotent-Replayed")) == (201, "true")
    assert (await again.json())["id"] == (await sent.json())["id"]
    other = await client.post(
        f"/v1/threads/{thread_id}/messages",
        json={"body": "no"},
        headers={**patient(portals), "Idempotency-Key": "answer-1"},
    )
    assert other.status == 422


async def test_consent_and_thread_fingerprints_are_keyed_too(client, portals: Portals, database) -> None:
    body = {"patient": "Patient/1", "grantee": "Practitioner/7", "scope": "messaging", "evidence": PORTAL}
    granted = await client.post("/v1/consents", json=body, headers={**patient(portals), "Idempotency-Key": "c-1"})
    assert granted.status == 201, await granted.text()
    opened = await client.post(
        "/v1/threads",
        json={"patient": "Patient/1", "participants": ["Practitioner/7"], "subject": "Results", "priority": "routine"},
        headers={**patient(portals), "Idempotency-Key": "t-1"},
    )
    assert opened.status == 201, await opened.text()

    stored = await _stored_hashes(database.owner)
    request = ConsentRequest("Patient/1", "Practitioner/7", Scope.MESSAGING, Evidence(EvidenceMethod.PORTAL, "v3"))
    thread_request = ["thread", "Patient/1", ["Practitioner/7"], "Results", "routine", False, None]
    unkeyed = _guesses(
        repr(request),
        json.dumps(thread_request, separators=(",", ":")),
        repr(("thread", "Patient/1", ["Practitioner/7"], "Results", "routine", False, None)),
    )
    for key in ("c-1", "t-1"):
        assert (len(stored[key]), stored[key][0]) == (33, 1), key
        assert not {stored[key], stored[key][1:]} & unkeyed, key
