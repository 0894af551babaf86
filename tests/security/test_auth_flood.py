"""A flood of failed authentications cannot flood the audit log: each source has a budget of audited
denials, the rest are answered 429 and counted in one summary event, and no denial goes uncounted."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from crypto.checkpoint import Ed25519CheckpointSigner
from service.app import create_app
from service.domain.audit_log import AuditLog
from service.domain.audit_verify import verify_database
from service.settings import Settings
from service.store.audit import AuditStore
from service.store.db import Database
from tests.conftest import Dsns, Portals, service_settings
from tests.support import audit_events

BUDGET = 5
FLOOD = 30
BAD_TOKEN = {"Authorization": "Bearer garbage", "X-Request-Id": "flood-12345678"}
Client = TestClient[web.Request, web.Application]
MakeClient = Callable[[web.Application], Awaitable[Client]]


@pytest.fixture
def limited(database: Dsns, kek_file: Path, signing_key_file: Path) -> Settings:
    """A budget of five denials per source that does not come back within a test, and summaries written
    only when the service stops."""
    return service_settings(
        database.app,
        kek_file,
        signing_key_file,
        auth_failure_burst=BUDGET,
        auth_failure_per_minute=0.001,
        auth_failure_summary_seconds=3600,
    )


async def _denials(database: Dsns) -> list[dict[str, Any]]:
    rows = await audit_events(database.owner, "action = 'auth:denied'")
    return [{**dict(r), "details": json.loads(r["details"])} for r in rows]


def _summaries(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["details"]["reason"] == "rate-limited"]


def _one_by_one(events: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    return [e for e in events if e["details"]["reason"] != "rate-limited" and e["source"] == source]


@pytest.fixture
async def from_another_address() -> AsyncIterator[aiohttp.ClientSession]:
    """HTTP from 127.0.0.2: another source as the server sees it (all of 127/8 is loopback)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))) as session:
        yield session


async def _verify(database: Dsns, settings: Settings, signing_key_file: Path) -> None:
    """Integrate what the service left in the outbox, then verify the whole log as the owner."""
    signer = Ed25519CheckpointSigner.load(signing_key_file)
    owner = await Database.connect(database.owner, min_size=1, max_size=2)
    try:
        audit_log = AuditLog(AuditStore(), signer, origin=settings.audit_origin)
        async with owner.session() as conn:
            while await audit_log.integrate(conn):
                pass
        result = await verify_database(
            owner, AuditStore(), vkey=signer.verifier_key().to_vkey(), origin=settings.audit_origin
        )
    finally:
        await owner.close()
    assert result.ok, result.problem


async def test_a_flood_of_bad_tokens_audits_the_budget_and_one_summary_counting_the_rest(
    aiohttp_client: MakeClient,
    limited: Settings,
    portals: Portals,
    database: Dsns,
    signing_key_file: Path,
    from_another_address: aiohttp.ClientSession,
) -> None:
    client = await aiohttp_client(create_app(limited))

    answers = [await client.get("/v1/me", headers=BAD_TOKEN) for _ in range(FLOOD)]

    assert [a.status for a in answers] == [401] * BUDGET + [429] * (FLOOD - BUDGET)
    throttled = answers[-1]
    assert throttled.content_type == "application/problem+json"
    assert int(throttled.headers["Retry-After"]) >= 1
    problem = await throttled.json()
    assert problem["code"] == "authentication-throttled"
    assert problem["request_id"] == throttled.headers["X-Request-Id"]
    assert "garbage" not in json.dumps(problem)
    # Another source has its own budget; a good token from the flooding source is not limited at all.
    other = await from_another_address.get(client.make_url("/v1/me"), headers=BAD_TOKEN)
    assert other.status == 401
    good = await client.get("/v1/me", headers=portals.acme.auth(role="patient", sub="Patient/1"))
    assert good.status == 200
    before_stop = await _denials(database)
    assert len(_one_by_one(before_stop, "127.0.0.1")) == BUDGET
    assert _summaries(before_stop) == []  # counted in memory until the summary is due

    await client.close()  # the service stops: what it counted is written on the way out

    events = await _denials(database)
    audited = _one_by_one(events, "127.0.0.1")
    assert len(audited) == BUDGET
    # Each has the service's own request id, and the flood's own id as a detail beside it.
    assert [e["request_id"] for e in audited] == [a.headers["X-Request-Id"] for a in answers[:BUDGET]]
    assert {e["details"]["client_request_id"] for e in audited} == {"flood-12345678"}
    assert len(_one_by_one(events, "127.0.0.2")) == 1
    [summary] = _summaries(events)
    assert summary["source"] == "127.0.0.1"
    assert summary["outcome"] == "denied"
    assert summary["tenant_id"] is None  # "garbage" named no tenant
    details = summary["details"]
    assert details["suppressed"] == FLOOD - BUDGET
    assert details["reasons"] == ["malformed"]
    assert details["first_at"] <= details["last_at"]
    assert summary["request_id"] not in {a.headers["X-Request-Id"] for a in answers}
    await _verify(database, limited, signing_key_file)


async def test_summaries_are_written_periodically_and_count_each_denial_once(
    aiohttp_client: MakeClient,
    database: Dsns,
    kek_file: Path,
    signing_key_file: Path,
) -> None:
    settings = service_settings(
        database.app,
        kek_file,
        signing_key_file,
        auth_failure_burst=BUDGET,
        auth_failure_per_minute=0.001,
        auth_failure_summary_seconds=0.3,
    )
    client = await aiohttp_client(create_app(settings))

    async def flood(n: int) -> None:
        assert {(await client.get("/v1/me", headers=BAD_TOKEN)).status for _ in range(n)} <= {401, 429}

    async def summarized(total: int) -> list[int]:
        """The summaries' counts once they add up to `total` (a flush may fall in the middle of a flood)."""
        for _ in range(100):
            counts = [s["details"]["suppressed"] for s in _summaries(await _denials(database))]
            if sum(counts) >= total:
                return counts
            await asyncio.sleep(0.1)
        raise AssertionError("no summary was written while the service ran")

    await flood(BUDGET + 7)
    first = await summarized(7)
    assert sum(first) == 7
    await flood(4)  # the source is still past its budget: four more, in summaries of their own
    later = await summarized(11)
    assert sum(later) == 11
    assert len(later) > len(first)
    await client.close()

    events = await _denials(database)
    assert len(_one_by_one(events, "127.0.0.1")) == BUDGET
    assert sorted(s["details"]["suppressed"] for s in _summaries(events)) == sorted(later)  # nothing more on stop
    await _verify(database, settings, signing_key_file)


async def test_bad_webhook_signatures_spend_the_same_budget(
    aiohttp_client: MakeClient, limited: Settings, database: Dsns
) -> None:
    client = await aiohttp_client(create_app(limited))
    for _ in range(BUDGET):
        assert (await client.get("/v1/me", headers=BAD_TOKEN)).status == 401
    signed_badly = {
        "webhook-id": f"msg_{uuid.uuid4().hex}",
        "webhook-timestamp": str(int(time.time())),
        "webhook-signature": "v1,AAAA",
        "Content-Type": "application/json",
    }

    reply = await client.post(f"/v1/inbound/{uuid.uuid4()}/replies", data=b"{}", headers=signed_badly)

    assert reply.status == 429
    assert (await reply.json())["code"] == "authentication-throttled"
    assert int(reply.headers["Retry-After"]) >= 1
    assert "WWW-Authenticate" not in reply.headers  # no bearer token was refused: nothing to challenge
    await client.close()
    [summary] = _summaries(await _denials(database))
    assert summary["details"]["suppressed"] == 1
    assert summary["details"]["reasons"] == ["unknown-endpoint"]


async def test_a_throttled_bearer_token_hears_the_challenge_its_401_would_have_carried(
    aiohttp_client: MakeClient, limited: Settings
) -> None:
    client = await aiohttp_client(create_app(limited))
    refused = [await client.get("/v1/me", headers=BAD_TOKEN) for _ in range(BUDGET)]
    invalid_token = 'Bearer realm="bedside", error="invalid_token"'
    assert {(r.status, r.headers["WWW-Authenticate"]) for r in refused} == {(401, invalid_token)}

    throttled = await client.get("/v1/me", headers=BAD_TOKEN)
    without_token = await client.get("/v1/me")

    # A portal that renews its token on invalid_token learns that the token is the trouble; one that sent
    # none hears the bare challenge, as its 401 would have said (RFC 6750).
    assert (throttled.status, throttled.headers["WWW-Authenticate"]) == (429, invalid_token)
    assert (without_token.status, without_token.headers["WWW-Authenticate"]) == (429, 'Bearer realm="bedside"')
    assert int(throttled.headers["Retry-After"]) >= 1
    assert (await throttled.json())["code"] == "authentication-throttled"
    document = await (await client.get("/openapi.json")).json()
    responses = document["paths"]["/v1/me"]["get"]["responses"]
    assert {"WWW-Authenticate", "Retry-After"} <= set(responses["429"]["headers"])
    signed = document["paths"]["/v1/inbound/{endpoint_id}/replies"]["post"]["responses"]
    assert "WWW-Authenticate" not in signed["429"]["headers"]
