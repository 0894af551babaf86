"""A streamed body that fails after its headers are out is cut short, never completed and never followed
by a second response: real HTTP on loopback, the service's own helper, a generator that fails."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from service.api.middleware import problems
from service.api.streaming import stream_body
from service.keys import REQUEST_ID

closed: list[str] = []


async def _pieces(fail: bool) -> AsyncGenerator[bytes, None]:
    try:
        yield b"first line\n"
        yield b"second line\n"
        if fail:
            raise RuntimeError("the database went away mid-export")
        yield b"last line\n"
    finally:
        closed.append("fail" if fail else "ok")


async def _handler(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    fail = request.query.get("fail") == "1"
    return await stream_body(request, response, _pieces(fail), event="test.stream", attachment_id="a-1")


@web.middleware
async def _request_id(request: web.Request, handler):
    request[REQUEST_ID] = "test-request"
    return await handler(request)


@pytest.fixture
async def streaming(aiohttp_client):
    # The service's own error middleware is in the chain: an exception escaping the stream would make it
    # write a second (problem+json) response into this one's body.
    app = web.Application(middlewares=[_request_id, problems])
    app.router.add_get("/stream", _handler)
    closed.clear()
    return await aiohttp_client(app)


async def test_a_complete_stream_ends_properly(streaming) -> None:
    response = await streaming.get("/stream")
    assert response.status == 200
    assert await response.read() == b"first line\nsecond line\nlast line\n"
    assert closed == ["ok"]


async def test_a_failure_after_the_headers_cuts_the_stream_short_and_is_logged(streaming) -> None:
    with capture_logs() as logs:
        response = await streaming.get("/stream?fail=1")
        assert response.status == 200  # the headers were out before the failure: no status can change
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()  # no final chunk: every client sees the body is incomplete
    aborted = [e for e in logs if e["event"] == "test.stream_aborted"]
    assert len(aborted) == 1
    assert aborted[0]["attachment_id"] == "a-1"
    assert closed == ["fail"]  # the generator (and whatever it holds) was closed


async def test_the_cut_stream_carries_one_response_and_no_end(streaming) -> None:
    """On the wire: one status line, the bytes written before the failure, and no terminating chunk."""
    reader, writer = await asyncio.open_connection(streaming.server.host, streaming.server.port)
    writer.write(b"GET /stream?fail=1 HTTP/1.1\r\nHost: test\r\n\r\n")
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), timeout=10)  # until the server cuts the connection
    writer.close()
    assert raw.count(b"HTTP/1.1 ") == 1
    assert raw.startswith(b"HTTP/1.1 200 ")
    assert b"second line" in raw
    assert b"problem" not in raw
    assert not raw.endswith(b"0\r\n\r\n")
