"""Requests the HTTP parser refuses, before any middleware runs, served as `bedside serve` serves them:
a problem document with fixed text, a request id, the request log event and metrics, and nothing of the
bytes the client sent (aiohttp's own answer is text/plain quoting them)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from service.api.server import app_runner
from service.app import create_app
from service.settings import Settings

CANARY = "CANARY-parser-7f3a"

MALFORMED = {
    "control character in a header value": f"GET /v1/me HTTP/1.1\r\nHost: a\r\nX-Note: {CANARY}\x01\r\n\r\n",
    "unknown method": f"{CANARY} /v1/me HTTP/1.1\r\nHost: a\r\n\r\n",
    "content length that is not a number": f"POST /v1/threads HTTP/1.1\r\nHost: a\r\nContent-Length: {CANARY}\r\n\r\n",
    "request line too long": f"GET /v1/me?q={CANARY}{'a' * 9000} HTTP/1.1\r\nHost: a\r\n\r\n",
    "header line too long": f"GET /v1/me HTTP/1.1\r\nHost: a\r\nX-Note: {CANARY}{'a' * 9000}\r\n\r\n",
    "header name with a space": f"GET /v1/me HTTP/1.1\r\nHost: a\r\n{CANARY} x: 1\r\n\r\n",
}


@pytest.fixture
async def base(settings: Settings) -> AsyncIterator[tuple[str, int]]:
    runner = app_runner(create_app(settings), shutdown_timeout=5)
    await runner.setup()
    try:
        site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield host, port
    finally:
        await runner.cleanup()


async def _exchange(address: tuple[str, int], raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `raw` as it is and read the whole answer, to the server's closing the connection."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(raw)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout=30)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split(" ")[1]), headers, body


async def _unparsed_count(address: tuple[str, int]) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"http://{address[0]}:{address[1]}/metrics") as r:
        text = await r.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "bedside_http_requests_total"
        and sample.labels == {"route": "<unmatched>", "method": "OTHER", "status": "400"}
    )


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_request_the_parser_refuses_is_a_400_problem_that_quotes_nothing(
    base: tuple[str, int], raw: str
) -> None:
    counted = await _unparsed_count(base)
    with capture_logs() as logs:  # raw events, before the allow-list could drop anything
        status, headers, body = await _exchange(base, raw.encode("latin-1"))

    assert status == 400
    assert headers["content-type"] == "application/problem+json"
    problem = json.loads(body)
    assert problem["status"] == 400
    assert problem["code"] == "bad-request"
    assert problem["type"] == "urn:bedside:problem:bad-request"
    assert problem["request_id"] == headers["x-request-id"]
    assert CANARY.encode() not in body
    assert CANARY not in repr(headers)
    # One request log event like any other's, and nothing of the request in it.
    [event] = [e for e in logs if e["event"] == "http.request"]
    assert (event["status"], event["route"], event["method"]) == (400, "<unmatched>", "OTHER")
    assert event["request_id"] == problem["request_id"]
    assert CANARY not in repr(logs)
    assert await _unparsed_count(base) == counted + 1


async def test_an_error_that_escapes_every_middleware_is_a_500_problem_that_quotes_nothing(settings: Settings) -> None:
    """Nothing in the service raises past `problems`; should something outside it ever do, aiohttp's own
    answer (text, with a traceback in debug mode) is replaced by the same 500 problem as every other."""
    app = create_app(settings)

    @aiohttp.web.middleware
    async def broken(request: aiohttp.web.Request, handler: Any) -> aiohttp.web.StreamResponse:
        raise RuntimeError(CANARY)

    app.middlewares.insert(0, broken)
    runner = app_runner(app, shutdown_timeout=5)
    await runner.setup()
    try:
        site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        with capture_logs() as logs:
            status, headers, body = await _exchange(
                runner.addresses[0][:2], b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
            )
    finally:
        await runner.cleanup()

    assert status == 500
    assert headers["content-type"] == "application/problem+json"
    problem = json.loads(body)
    assert (problem["status"], problem["code"]) == (500, "internal-error")
    assert CANARY.encode() not in body
    [event] = [e for e in logs if e["event"] == "http.unhandled"]
    assert event["request_id"] == problem["request_id"] == headers["x-request-id"]
    assert isinstance(event["exc_info"], RuntimeError)  # reduced to its type and location by the log chain
