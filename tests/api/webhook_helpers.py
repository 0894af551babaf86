"""A real webhook receiver on loopback that a test controls, and the steps an admin takes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.conftest import Portals

ADMIN = {"role": "admin", "sub": "Practitioner/admin"}


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Receiver:
    """An aiohttp server on 127.0.0.1. `respond(received) -> (status, headers)` decides each answer
    (200 by default); `stop()` and `start()` take it down and bring it back on the same port."""

    port: int = field(default_factory=free_port)
    received: list[Received] = field(default_factory=list)
    respond: Callable[[Received], tuple[int, dict[str, str]]] = lambda r: (200, {})
    delay: float = 0.0
    _runner: web.AppRunner | None = None
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/bedside?token=receiver-secret"

    async def _handle(self, request: web.Request) -> web.Response:
        received = Received({k.lower(): v for k, v in request.headers.items()}, await request.read())
        if self.delay:
            await asyncio.sleep(self.delay)
        self.received.append(received)
        self._arrived.set()
        status, headers = self.respond(received)
        return web.Response(status=status, headers=headers, text="receiver body that must never be stored")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def wait_for(self, predicate: Callable[[list[Received]], bool], within: float = 20.0) -> None:
        """Wait until `predicate(self.received)` holds; fail the test after `within` seconds."""
        deadline = asyncio.get_running_loop().time() + within
        while not predicate(self.received):
            remaining = deadline - asyncio.get_running_loop().time()
            assert remaining > 0, f"timed out; the receiver has {len(self.received)} requests"
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), min(remaining, 0.2))


async def register(
    client: Any,
    portals: Portals,
    url: str,
    *,
    subscriber: str = "Practitioner/7",
    event_types: list[str] | None = None,
    ed25519: bool = False,
) -> dict[str, Any]:
    body = {
        "subscriber": subscriber,
        "url": url,
        "event_types": event_types or ["message.created", "thread.created", "message.recalled", "consent.revoked"],
        "ed25519": ed25519,
    }
    response = await client.post("/v1/admin/webhook-endpoints", json=body, headers=portals.acme.auth(**ADMIN))
    assert response.status == 201, await response.text()
    created: dict[str, Any] = await response.json()
    return created


async def admin_get(client: Any, portals: Portals, path: str) -> Any:
    response = await client.get(path, headers=portals.acme.auth(**ADMIN))
    assert response.status == 200, await response.text()
    return await response.json()


async def wait_for_delivery(
    client: Any,
    portals: Portals,
    endpoint_id: str,
    predicate: Callable[[list[dict[str, Any]]], bool],
    within: float = 20.0,
) -> list[dict[str, Any]]:
    """Poll the admin API until the endpoint's deliveries satisfy `predicate`."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        listed = await admin_get(client, portals, f"/v1/admin/webhook-endpoints/{endpoint_id}/deliveries?limit=200")
        items: list[dict[str, Any]] = listed["items"]
        if predicate(items):
            return items
        assert asyncio.get_running_loop().time() < deadline, f"timed out; deliveries: {items}"
        await asyncio.sleep(0.1)
