"""Behind a trusted proxy each client is itself: its own budget of failed authentications, its own address
in the audit log. Without one, X-Forwarded-For is nobody's word, and a client cannot choose its address."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from service.app import create_app
from service.settings import Settings
from tests.conftest import Dsns, Portals, service_settings
from tests.support import audit_events

BUDGET = 3
BAD_TOKEN = {"Authorization": "Bearer garbage"}
Client = TestClient[web.Request, web.Application]
MakeClient = Callable[[web.Application], Awaitable[Client]]


def _limited(database: Dsns, kek_file: Path, signing_key_file: Path, **overrides: object) -> Settings:
    """A budget of three denials per source that does not come back within a test."""
    return service_settings(
        database.app,
        kek_file,
        signing_key_file,
        auth_failure_burst=BUDGET,
        auth_failure_per_minute=0.001,
        auth_failure_summary_seconds=3600,
        **overrides,
    )


@pytest.fixture
def behind_a_proxy(database: Dsns, kek_file: Path, signing_key_file: Path) -> Settings:
    """The test client is the proxy: loopback is trusted, as are the proxies' 10/8 hops."""
    return _limited(database, kek_file, signing_key_file, trusted_proxies="127.0.0.1, 10.0.0.0/8")


def _forwarded(*addresses: str) -> dict[str, str]:
    return {**BAD_TOKEN, "X-Forwarded-For": ", ".join(addresses)}


async def _sources(database: Dsns, action: str = "auth:denied") -> list[Any]:
    """The source of each event of `action` audited one by one, oldest first."""
    rows = await audit_events(database.owner, "action = $1", action)
    return [r["source"] for r in rows if json.loads(r["details"]).get("reason") != "rate-limited"]


async def test_two_clients_behind_a_trusted_proxy_have_budgets_of_their_own(
    aiohttp_client: MakeClient, behind_a_proxy: Settings, database: Dsns
) -> None:
    client = await aiohttp_client(create_app(behind_a_proxy))

    first = [(await client.get("/v1/me", headers=_forwarded("198.51.100.1"))).status for _ in range(BUDGET + 2)]
    second = [(await client.get("/v1/me", headers=_forwarded("198.51.100.2"))).status for _ in range(BUDGET)]

    assert first == [401] * BUDGET + [429] * 2
    assert second == [401] * BUDGET  # the other portal's users are not answered for the first one's failures
    assert await _sources(database) == ["198.51.100.1"] * BUDGET + ["198.51.100.2"] * BUDGET


@pytest.mark.parametrize(
    "trusted_proxies",
    [
        pytest.param(None, id="unset"),
        pytest.param("10.0.0.0/8", id="proxies-elsewhere"),
    ],
)
async def test_a_client_that_is_no_trusted_proxy_cannot_escape_its_budget_with_x_forwarded_for(
    aiohttp_client: MakeClient,
    database: Dsns,
    kek_file: Path,
    signing_key_file: Path,
    trusted_proxies: str | None,
) -> None:
    given = {} if trusted_proxies is None else {"trusted_proxies": trusted_proxies}
    settings = _limited(database, kek_file, signing_key_file, **given)
    assert bool(settings.trusted_proxies) == (trusted_proxies is not None)  # unset: no proxy is trusted
    client = await aiohttp_client(create_app(settings))

    statuses = [
        (await client.get("/v1/me", headers=_forwarded(f"198.51.100.{n}"))).status for n in range(1, BUDGET + 3)
    ]

    assert statuses == [401] * BUDGET + [429] * 2
    assert await _sources(database) == ["127.0.0.1"] * BUDGET


async def test_a_spoofed_leftmost_entry_does_not_choose_the_address(
    aiohttp_client: MakeClient, behind_a_proxy: Settings, database: Dsns
) -> None:
    client = await aiohttp_client(create_app(behind_a_proxy))

    # The client writes an address of its choosing, a new one each time; the proxies append what they saw.
    statuses = [
        (await client.get("/v1/me", headers=_forwarded(f"203.0.113.{n}", "198.51.100.1", "10.1.2.3"))).status
        for n in range(1, BUDGET + 3)
    ]

    assert statuses == [401] * BUDGET + [429] * 2
    assert await _sources(database) == ["198.51.100.1"] * BUDGET


async def test_the_audit_events_of_a_request_name_the_forwarded_client(
    aiohttp_client: MakeClient, behind_a_proxy: Settings, database: Dsns, portals: Portals
) -> None:
    client = await aiohttp_client(create_app(behind_a_proxy))
    patient = portals.acme.auth(role="patient", sub="Patient/1")

    refused = await client.get("/v1/admin/issuers", headers={**patient, "X-Forwarded-For": "2001:db8::7"})
    failed = await client.get("/v1/me", headers={**BAD_TOKEN, "X-Forwarded-For": "[2001:db8::8]:4711"})

    assert (refused.status, failed.status) == (404, 401)
    assert await _sources(database, "access:denied") == ["2001:db8::7"]
    assert await _sources(database, "auth:denied") == ["2001:db8::8"]


@pytest.mark.parametrize(
    "header",
    [
        "bogus",
        "198.51.100.1, <script>",
        "unknown",
        "[198.51.100.1",
        "198.51.100.1:x",
        "fe80::1%spoofed",
        "\u00ff" * 4000,
        "1" * 4000,
    ],
)
async def test_a_malformed_x_forwarded_for_is_answered_as_usual_and_the_proxy_is_the_source(
    aiohttp_client: MakeClient, behind_a_proxy: Settings, database: Dsns, header: str
) -> None:
    client = await aiohttp_client(create_app(behind_a_proxy))

    answers = [
        await client.get("/v1/me", headers={**BAD_TOKEN, "X-Forwarded-For": header}),
        # In a field of its own after the client's address: the walk from the right stops at it all the same.
        await client.get(
            "/v1/me", headers=[*BAD_TOKEN.items(), ("X-Forwarded-For", "198.51.100.9"), ("X-Forwarded-For", header)]
        ),
    ]

    assert [a.status for a in answers] == [401, 401]
    assert [(await a.json())["code"] for a in answers] == ["unauthenticated"] * 2
    # The last hop that could be read is the proxy's own: a client-written value never is the address.
    assert await _sources(database) == ["127.0.0.1", "127.0.0.1"]


@pytest.mark.parametrize("header", ["", " , ,"])
async def test_an_empty_x_forwarded_for_names_no_client(
    aiohttp_client: MakeClient, behind_a_proxy: Settings, database: Dsns, header: str
) -> None:
    client = await aiohttp_client(create_app(behind_a_proxy))

    alone = await client.get("/v1/me", headers={**BAD_TOKEN, "X-Forwarded-For": header})
    after = await client.get(
        "/v1/me", headers=[*BAD_TOKEN.items(), ("X-Forwarded-For", "198.51.100.9"), ("X-Forwarded-For", header)]
    )

    assert (alone.status, after.status) == (401, 401)
    # Empty list elements are skipped (RFC 9110 section 5.6.1): nothing forwarded is the proxy itself.
    assert await _sources(database) == ["127.0.0.1", "198.51.100.9"]
