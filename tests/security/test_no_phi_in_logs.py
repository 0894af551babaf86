"""No PHI through side doors (DESIGN invariant 5): whatever a request carries, in its body, token, query,
headers or path, never reaches a log event or a metrics label.

Each probe sends one request carrying a canary. Logs are captured twice: through the processors every
event passes in production (`redacting_processors`), and raw, before any redaction, so that a call site
that passes content to the logger is caught even though the allow-list would have dropped it.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import ClientResponse
from structlog.testing import capture_logs

import service.logs
from service.logs import drop_unknown_keys, redacting_processors, summarize_exception
from tests.conftest import Portals
from tests.support import canary

ISSUERS = "/v1/admin/issuers"


@dataclass(frozen=True)
class Sent:
    response: ClientResponse
    route: str  # the template the access event must name
    secrets: tuple[str, ...]  # strings that must appear in no event


Probe = Callable[[Any, Portals, str], Awaitable[Sent]]


def _admin(portals: Portals) -> dict[str, str]:
    return portals.acme.auth(role="admin", sub="Practitioner/admin1")


async def _field_value(client, portals: Portals, planted: str) -> Sent:
    body = {"issuer": planted, "public_key_pem": f"-----BEGIN PUBLIC KEY-----\n{planted}\n", "kid": planted}
    return Sent(await client.post(ISSUERS, json=body, headers=_admin(portals)), ISSUERS, (planted,))


async def _unknown_field_value(client, portals: Portals, planted: str) -> Sent:
    body = {"issuer": "https://portal.acme.test", "public_key_pem": "x", "note": planted}
    return Sent(await client.post(ISSUERS, json=body, headers=_admin(portals)), ISSUERS, (planted,))


async def _invalid_json(client, portals: Portals, planted: str) -> Sent:
    headers = {**_admin(portals), "Content-Type": "application/json"}
    response = await client.post(ISSUERS, data=f'{{"issuer": "{planted}", '.encode(), headers=headers)
    return Sent(response, ISSUERS, (planted,))


async def _text_body(client, portals: Portals, planted: str) -> Sent:
    headers = {**_admin(portals), "Content-Type": "text/plain"}
    return Sent(await client.post(ISSUERS, data=planted.encode(), headers=headers), ISSUERS, (planted,))


async def _accepted_token(client, portals: Portals, planted: str) -> Sent:
    token = portals.acme.token(role="patient", sub=f"Patient/{planted}", jti=planted)
    response = await client.get("/v1/me", headers={"Authorization": f"Bearer {token}"})
    return Sent(response, "/v1/me", (planted, token))


async def _refused_token(client, portals: Portals, planted: str) -> Sent:
    token = portals.acme.token(tid=planted.lower(), sub=f"Patient/{planted}")
    response = await client.get("/v1/me", headers={"Authorization": f"Bearer {token}"})
    return Sent(response, "/v1/me", (planted, planted.lower(), token))


async def _garbage_token(client, portals: Portals, planted: str) -> Sent:
    response = await client.get("/v1/me", headers={"Authorization": f"Bearer {planted}"})
    return Sent(response, "/v1/me", (planted,))


async def _token_with_unencodable_tenant(client, portals: Portals, planted: str) -> Sent:
    # Should such a claim ever reach the driver, its error quotes the query argument: only the type may be logged.
    token = portals.acme.token(tid=planted + "\ud800")
    response = await client.get("/v1/me", headers={"Authorization": f"Bearer {token}"})
    return Sent(response, "/v1/me", (planted, token))


async def _query_string(client, portals: Portals, planted: str) -> Sent:
    response = await client.get("/v1/me", params={"note": planted}, headers=portals.acme.auth())
    return Sent(response, "/v1/me", (planted,))


async def _request_id_with_a_space(client, portals: Portals, planted: str) -> Sent:
    response = await client.get("/v1/me", headers={**portals.acme.auth(), "X-Request-Id": f"{planted} x"})
    assert response.headers["X-Request-Id"] != f"{planted} x"
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-Id"])
    return Sent(response, "/v1/me", (planted,))


async def _request_id_with_symbols(client, portals: Portals, planted: str) -> Sent:
    response = await client.get("/healthz", headers={"X-Request-Id": f"{planted};<script>"})
    assert planted not in response.headers["X-Request-Id"]
    return Sent(response, "/healthz", (planted,))


async def _unknown_route(client, portals: Portals, planted: str) -> Sent:
    response = await client.get(f"/v1/patients/{planted}/messages", headers=portals.acme.auth())
    return Sent(response, "<unmatched>", (planted,))


async def _wrong_method(client, portals: Portals, planted: str) -> Sent:
    response = await client.delete(f"/v1/me?note={planted}", headers=portals.acme.auth())
    return Sent(response, "<unmatched>", (planted,))


PROBES = [
    pytest.param(_field_value, id="json-field-value"),
    pytest.param(_unknown_field_value, id="unknown-field-value"),
    pytest.param(_invalid_json, id="invalid-json"),
    pytest.param(_text_body, id="text-body"),
    pytest.param(_accepted_token, id="accepted-token"),
    pytest.param(_refused_token, id="refused-token"),
    pytest.param(_garbage_token, id="garbage-token"),
    pytest.param(_token_with_unencodable_tenant, id="token-with-unencodable-tenant"),
    pytest.param(_query_string, id="query-string"),
    pytest.param(_request_id_with_a_space, id="request-id-with-space"),
    pytest.param(_request_id_with_symbols, id="request-id-with-symbols"),
    pytest.param(_unknown_route, id="unknown-route-path"),
    pytest.param(_wrong_method, id="wrong-method"),
]


def _flatten(event: dict[str, Any]) -> str:
    return " ".join(f"{key!s}={value!s}" for key, value in event.items())


@pytest.mark.parametrize("probe", PROBES)
async def test_request_content_never_reaches_the_logs(client, portals: Portals, probe: Probe) -> None:
    # The same request twice: once through the production processors, once raw (no redaction at all).
    for mode, processors in (("redacted", redacting_processors()), ("raw", [])):
        planted = canary("log")
        with capture_logs(processors=processors) as events:
            sent = await probe(client, portals, planted)
            await sent.response.read()

        assert events, f"{mode}: the request logged nothing at all"
        for event in events:
            flat = _flatten(event)
            for secret in sent.secrets:
                assert secret not in flat, (mode, event)
        access = [event for event in events if event["event"] == "http.request"]
        assert len(access) == 1, (mode, events)
        assert access[0]["route"] == sent.route, mode
        assert access[0]["status"] == sent.response.status, mode
        if mode == "redacted":
            assert access[0]["request_id"] == sent.response.headers["X-Request-Id"]


async def test_each_request_logs_exactly_one_access_event(client, portals: Portals) -> None:
    with capture_logs(processors=redacting_processors()) as events:
        for _ in range(3):
            await (await client.get("/v1/me", headers=portals.acme.auth())).read()
        await (await client.get("/healthz")).read()

    access = [(event["route"], event["status"]) for event in events if event["event"] == "http.request"]
    assert access == [("/v1/me", 200)] * 3 + [("/healthz", 200)]


# --- the redacting processors themselves -------------------------------------------------------------------


def test_unknown_keys_are_dropped_and_counted() -> None:
    planted = canary("body")
    event = {"event": "message.sent", "request_id": "req-1", "body": planted, "subject": planted}

    out = drop_unknown_keys(None, "info", dict(event))

    assert out == {"event": "message.sent", "request_id": "req-1", "dropped_keys": 2}


def test_allowed_keys_pass_unchanged_and_nothing_is_counted() -> None:
    event = {"event": "http.request", "route": "/v1/me", "status": 200, "tenant": "acme"}
    assert drop_unknown_keys(None, "info", dict(event)) == event


def test_every_allowed_key_is_an_identifier_not_content() -> None:
    # Adding a key to the allow-list is a decision; these could carry what a patient wrote.
    assert (
        not {
            "body",
            "subject",
            "text",
            "content",
            "message",
            "token",
            "authorization",
            "headers",
            "query",
            "path",
            "exception",
            "detail",
            "input",
        }
        & service.logs.ALLOWED_KEYS
    )


def _raise_with(planted: str) -> None:
    raise ValueError(f"duplicate key value violates unique constraint: {planted}")


def test_an_exception_is_logged_as_its_type_and_location_only() -> None:
    planted = canary("exception")
    try:
        _raise_with(planted)
    except ValueError:
        out = summarize_exception(None, "error", {"event": "http.unhandled", "exc_info": True})

    assert set(out) == {"event", "error_type", "error_at"}
    assert out["error_type"] == "ValueError"
    assert out["error_at"].startswith("test_no_phi_in_logs.py:")
    assert out["error_at"].endswith(":_raise_with")
    assert planted not in _flatten(out)


@pytest.mark.parametrize("form", ["instance", "tuple"])
def test_exception_given_as_instance_or_tuple_is_summarized_too(form) -> None:
    planted = canary("exception")
    try:
        _raise_with(planted)
    except ValueError as exc:
        exc_info = exc if form == "instance" else sys.exc_info()

    out = summarize_exception(None, "error", {"event": "worker.failed", "exc_info": exc_info})

    assert out["error_type"] == "ValueError"
    assert planted not in _flatten(out)


def test_logger_call_with_exception_and_content_keys_logs_neither() -> None:
    planted = canary("logger")
    with capture_logs(processors=redacting_processors()) as events:
        try:
            _raise_with(planted)
        except ValueError:
            service.logs.get_logger("bedside.test").error("thing.failed", body=planted, exc_info=True)

    assert len(events) == 1
    assert events[0]["error_type"] == "ValueError"
    assert events[0]["dropped_keys"] == 1
    assert planted not in _flatten(events[0])
    assert planted not in json.dumps(events[0], default=str)


# --- metrics --------------------------------------------------------------------------------------------------


async def test_metrics_carry_route_templates_never_raw_paths_or_queries(client, portals: Portals) -> None:
    planted = canary("metrics")
    await (await client.get(f"/v1/patients/{planted}")).read()
    await (await client.get("/v1/me", params={"q": planted}, headers=portals.acme.auth())).read()
    await (await client.get("/healthz", params={planted: "1"})).read()
    await (await client.post(f"/v1/{planted}", data=planted)).read()

    text = await (await client.get("/metrics")).text()

    assert planted not in text
    assert 'route="<unmatched>"' in text
    assert 'route="/v1/me"' in text
    for line in text.splitlines():
        route = re.search(r'route="([^"]*)"', line)
        if route:
            assert route.group(1) in {"<unmatched>", "/v1/me", "/healthz"}, line
