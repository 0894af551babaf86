"""Graceful shutdown: a request in flight when the service is told to stop still gets its answer."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from service.app import create_app
from service.keys import PUBLIC_ROUTES


async def test_in_flight_request_finishes_during_shutdown(settings) -> None:
    app = create_app(settings)
    entered = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        entered.set()
        await asyncio.sleep(0.5)
        return web.json_response({"finished": True})

    app.router.add_get("/test/slow", slow, name="test_slow")
    app[PUBLIC_ROUTES] = app[PUBLIC_ROUTES] | {"test_slow"}
    runner = web.AppRunner(app, shutdown_timeout=5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]

    async with aiohttp.ClientSession() as session:
        pending = asyncio.create_task(session.get(f"http://{host}:{port}/test/slow"))
        await entered.wait()
        await runner.cleanup()  # what SIGINT/SIGTERM does in `bedside serve`
        response = await pending
        assert response.status == 200
        assert await response.json() == {"finished": True}
        response.release()

        # Once stopped, nothing new is accepted.
        try:
            await session.get(f"http://{host}:{port}/healthz")
        except aiohttp.ClientConnectionError:
            pass
        else:
            raise AssertionError("the stopped server still accepted a request")
