"""Probes, request ids and metrics: what an orchestrator and an operator see."""

from __future__ import annotations

import json
import re

import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr, ValidationError
from structlog.testing import capture_logs

from service.logs import redacting_processors
from service.settings import Settings
from tests.conftest import Dsns, Portals
from tests.support import audit_events, database_read_only, end_service_sessions

GENERATED_ID = re.compile(r"^[0-9a-f]{32}$")


async def test_health_is_ok_without_a_token(client) -> None:
    response = await client.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}


async def test_ready_when_the_database_is_reachable_and_current(client) -> None:
    response = await client.get("/readyz")
    assert response.status == 200
    body = await response.json()
    assert {k: body[k] for k in ("status", "database", "schema_version")} == {
        "status": "ready",
        "database": "ok",
        "schema_version": "current",
    }
    assert isinstance(body["audit_backlog"], int)  # reported, not judged (see the backlog test below)


async def test_not_ready_when_the_database_has_a_migration_this_code_does_not_know(client, database: Dsns) -> None:
    conn = await asyncpg.connect(database.owner)
    try:
        await conn.execute("INSERT INTO schema_migrations (version, name, checksum) VALUES (9999, 'future', 'x')")
    finally:
        await conn.close()

    response = await client.get("/readyz")

    assert response.status == 503
    body = await response.json()
    assert {k: body[k] for k in ("status", "database", "schema_version")} == {
        "status": "not-ready",
        "database": "ok",
        "schema_version": "not-current",
    }


async def test_not_ready_while_the_database_takes_no_writes_and_ready_once_it_does(client, database: Dsns) -> None:
    """A server that refuses writes (25006: an old primary a failover demoted, a hot standby) still answers
    reads, so a probe that only read would keep a replica in service whose every send is a 503. Its
    connections opened meanwhile are replaced: the first probe after the server takes writes again is ready."""
    async with database_read_only(database.owner, database.name):
        await end_service_sessions(database.owner)  # the pool's next connections are opened read-only
        response = await client.get("/readyz")
        assert response.status == 503
        body = await response.json()
        assert {k: body[k] for k in ("status", "database", "schema_version")} == {
            "status": "not-ready",
            "database": "read-only",
            "schema_version": "current",
        }

    response = await client.get("/readyz")
    assert response.status == 200, await response.text()
    assert (await response.json())["database"] == "ok"


VALID_REQUEST_IDS = ["req-12345678", "A.b_c-0123456789", "x" * 64]
INVALID_REQUEST_IDS = ["req 12345678", "short", "x" * 65, "req-1234;5678", "req-1234\t5678", "ümlaut-12345678", ""]


async def test_a_clients_request_id_never_becomes_the_request_id(client) -> None:
    for incoming in VALID_REQUEST_IDS:
        response = await client.get("/healthz", headers={"X-Request-Id": incoming})
        assert GENERATED_ID.fullmatch(response.headers["X-Request-Id"]), incoming


async def test_the_log_carries_the_services_request_id_and_the_clients_beside_it(client) -> None:
    with capture_logs(processors=redacting_processors()) as logs:
        response = await client.get("/v1/me", headers={"X-Request-Id": "req-12345678"})
        unlabelled = await client.get("/v1/me")
        odd = await client.get("/v1/me", headers={"X-Request-Id": "req 12345678"})

    lines = [e for e in logs if e["event"] == "http.request"]
    assert [(e["request_id"], e.get("client_request_id")) for e in lines] == [
        (response.headers["X-Request-Id"], "req-12345678"),
        (unlabelled.headers["X-Request-Id"], None),
        (odd.headers["X-Request-Id"], None),
    ]


async def test_an_audit_event_has_the_services_request_id_and_the_clients_as_a_detail(
    client, portals: Portals, database: Dsns
) -> None:
    """A caller cannot make its audit events share a request id with another caller's: the id is the
    service's, and the caller's own is a detail beside it."""
    patient = portals.acme.auth(role="patient", sub="Patient/1")
    other = portals.acme.auth(role="patient", sub="Patient/2")
    mine = await client.get("/v1/threads", headers={**patient, "X-Request-Id": "req-12345678"})
    theirs = await client.get("/v1/threads", headers={**other, "X-Request-Id": "req-12345678"})
    refused = await client.get("/v1/me", headers={"Authorization": "Bearer x", "X-Request-Id": "req-12345678"})
    assert (mine.status, theirs.status, refused.status) == (200, 200, 401)

    events = await audit_events(database.owner, "details->>'client_request_id' = $1", "req-12345678")

    assert [e["action"] for e in events] == ["thread:list", "thread:list", "auth:denied"]
    assert [e["request_id"] for e in events] == [r.headers["X-Request-Id"] for r in (mine, theirs, refused)]
    assert len({e["request_id"] for e in events}) == 3
    assert all(json.loads(e["details"])["client_request_id"] == "req-12345678" for e in events)
    unlabelled = await client.get("/v1/threads", headers=patient)
    [event] = await audit_events(database.owner, "request_id = $1", unlabelled.headers["X-Request-Id"])
    assert "client_request_id" not in json.loads(event["details"])


async def test_invalid_incoming_request_id_is_replaced_by_a_generated_one(client) -> None:
    # Space, too short, too long, semicolon, tab, non-ASCII, empty: it goes into logs, so only plain ids.
    for incoming in INVALID_REQUEST_IDS:
        response = await client.get("/healthz", headers={"X-Request-Id": incoming})
        assert GENERATED_ID.fullmatch(response.headers["X-Request-Id"]), repr(incoming)


async def test_each_request_without_an_id_gets_its_own(client) -> None:
    ids = {(await client.get("/healthz")).headers["X-Request-Id"] for _ in range(3)}
    assert len(ids) == 3
    assert all(GENERATED_ID.fullmatch(request_id) for request_id in ids)


async def test_problem_responses_carry_the_request_id_too(client) -> None:
    response = await client.get("/v1/me", headers={"X-Request-Id": "req-12345678"})
    assert response.status == 401
    assert GENERATED_ID.fullmatch(response.headers["X-Request-Id"])
    assert (await response.json())["request_id"] == response.headers["X-Request-Id"]


async def _requests_counter(client) -> dict[tuple[str, str, str], float]:
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.content_type == "text/plain"
    counts = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            if sample.name == "bedside_http_requests_total":
                counts[(sample.labels["route"], sample.labels["method"], sample.labels["status"])] = sample.value
    return counts


async def test_metrics_count_requests_by_route_template_and_status(client, portals: Portals) -> None:
    for _ in range(2):
        assert (await client.get("/v1/me", headers=portals.acme.auth())).status == 200
    assert (await client.get("/v1/me")).status == 401
    assert (await client.get("/v1/nowhere/1")).status == 404
    assert (await client.get("/v1/nowhere/2")).status == 404

    counts = await _requests_counter(client)

    assert counts[("/v1/me", "GET", "200")] == 2
    assert counts[("/v1/me", "GET", "401")] == 1
    assert counts[("<unmatched>", "GET", "404")] == 2


async def test_metrics_count_the_metrics_request_itself_afterwards(client) -> None:
    await _requests_counter(client)
    counts = await _requests_counter(client)
    assert counts[("/metrics", "GET", "200")] == 1


async def test_readiness_reports_the_audit_backlog_without_failing_on_it(aiohttp_client, settings, portals) -> None:
    from service.app import create_app

    client = await aiohttp_client(create_app(settings.model_copy(update={"audit_sequencer": False})))
    for _ in range(3):  # three refused logins: three audit events nobody integrates
        await client.get("/v1/me", headers={"Authorization": "Bearer nonsense"})
    response = await client.get("/readyz")
    body = await response.json()
    assert response.status == 200  # a stuck sequencer must not take every replica out of service
    assert body["audit_backlog"] >= 3
    assert body["audit_backlog_age_seconds"] >= 0


METRICS_TOKEN = "m" * 16 + "-metrics-token-0123456789"


async def test_metrics_need_the_configured_token_and_refusals_are_audited(
    aiohttp_client, settings, database: Dsns, portals: Portals
) -> None:
    """With BEDSIDE_METRICS_TOKEN set, a scrape without it, with another token or with a portal's valid
    token is a 401 with a bearer challenge, recorded as `auth:denied`; with it, the metrics."""
    from service.app import create_app

    client = await aiohttp_client(create_app(settings.model_copy(update={"metrics_token": SecretStr(METRICS_TOKEN)})))
    refused = [
        {},
        {"Authorization": f"Bearer {METRICS_TOKEN[:-1]}"},
        {"Authorization": f"Basic {METRICS_TOKEN}"},
        portals.acme.auth(),
    ]
    for headers in refused:
        response = await client.get("/metrics", headers=headers)
        assert response.status == 401, headers
        challenge = 'Bearer realm="bedside"' + (', error="invalid_token"' if headers else "")
        assert response.headers["WWW-Authenticate"] == challenge
        assert (await response.json())["code"] == "unauthenticated"
        assert "bedside_http_requests" not in await response.text()

    response = await client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert response.status == 200
    assert "bedside_http_requests_total" in await response.text()
    denials = await audit_events(database.owner, "action = 'auth:denied' AND resource_id = '/metrics'")
    # No credentials at all is "missing" (and its challenge names no error, as RFC 6750 says).
    assert [json.loads(event["details"])["reason"] for event in denials] == ["missing"] + ["metrics-token"] * 3


def test_a_short_metrics_token_is_refused_at_start_up() -> None:
    with pytest.raises(ValidationError, match="32 to 256"):
        Settings(metrics_token=SecretStr("short-token"))
