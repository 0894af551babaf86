"""Graceful shutdown: a request in flight when the service is told to stop still gets its answer; one
still running when the shutdown timeout ends is cancelled, and logged as such (499), not as a 500."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
from aiohttp import web
from structlog.testing import capture_logs

from service.api.server import app_runner
from service.app import create_app
from service.keys import PUBLIC_ROUTES


async def _serving(settings, takes: float, shutdown_timeout: float) -> tuple[web.AppRunner, str, asyncio.Event]:
    """The service with one more public route, `/test/slow`, that answers after `takes` seconds; its
    runner, the route's URL, and an event set once a request is inside the handler."""
    app = create_app(settings)
    entered = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        entered.set()
        await asyncio.sleep(takes)
        return web.json_response({"finished": True})

    app.router.add_get("/test/slow", slow, name="test_slow")
    app[PUBLIC_ROUTES] = app[PUBLIC_ROUTES] | {"test_slow"}
    runner = app_runner(app, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}", entered


async def test_in_flight_request_finishes_during_shutdown(settings) -> None:
    runner, base, entered = await _serving(settings, takes=0.5, shutdown_timeout=5)

    async with aiohttp.ClientSession() as session:
        pending = asyncio.create_task(session.get(f"{base}/test/slow"))
        await entered.wait()
        await runner.cleanup()  # what SIGINT/SIGTERM does in `bedside serve`
        response = await pending
        assert response.status == 200
        assert await response.json() == {"finished": True}
        response.release()

        # Once stopped, nothing new is accepted.
        try:
            await session.get(f"{base}/healthz")
        except aiohttp.ClientConnectionError:
            pass
        else:
            raise AssertionError("the stopped server still accepted a request")


async def test_a_request_cancelled_at_shutdown_is_logged_as_499_not_500(settings) -> None:
    runner, base, entered = await _serving(settings, takes=30, shutdown_timeout=0.2)

    with capture_logs() as logs:
        async with aiohttp.ClientSession() as session:
            pending = asyncio.create_task(session.get(f"{base}/test/slow"))
            await entered.wait()
            await runner.cleanup()  # past the timeout, the handler is cancelled
            with contextlib.suppress(aiohttp.ClientError):  # the connection closed without an answer
                (await pending).release()
    statuses = [e["status"] for e in logs if e["event"] == "http.request" and e.get("route") == "/test/slow"]
    assert statuses == [499]
