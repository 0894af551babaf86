"""Shared steps of the messaging tests: the same things a portal would do."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import aiohttp
import asyncpg
import pytest

from tests.conftest import Portals

PORTAL = {"method": "portal", "text_version": "v3"}
ATTACHMENTS_URL = "/v1/attachments"


def patient(portals: Portals, n: int = 1) -> dict[str, str]:
    return portals.acme.auth(role="patient", sub=f"Patient/{n}")


def physician(portals: Portals, n: int = 7) -> dict[str, str]:
    return portals.acme.auth(role="physician", sub=f"Practitioner/{n}")


async def consent(client: Any, portals: Portals, grantee: str = "Practitioner/7", n: int = 1, **extra: Any) -> dict:
    body = {"patient": f"Patient/{n}", "grantee": grantee, "scope": "messaging", "evidence": PORTAL, **extra}
    response = await client.post("/v1/consents", json=body, headers=patient(portals, n))
    assert response.status == 201, await response.text()
    return await response.json()


async def thread(
    client: Any,
    portals: Portals,
    *,
    participants: list[str] | None = None,
    n: int = 1,
    message: str | None = "Hello",
    **extra: Any,
) -> dict:
    body: dict[str, Any] = {
        "patient": f"Patient/{n}",
        "participants": participants or ["Practitioner/7"],
        "subject": "Question about my medication",
        **extra,
    }
    if message is not None:
        body["message"] = {"body": message}
    response = await client.post("/v1/threads", json=body, headers=patient(portals, n))
    assert response.status == 201, await response.text()
    return await response.json()


async def upload(
    client: Any,
    headers: dict[str, str],
    thread_id: str,
    data: Any,
    content_type: str | None = "application/pdf",
    file_name: str = "scan.pdf",
    **extra_headers: str,
) -> aiohttp.ClientResponse:
    """`data` posted as an attachment of the thread, its name percent-encoded in `Bedside-File-Name`."""
    sent = {**headers, **extra_headers}
    if content_type is not None:
        sent["Content-Type"] = content_type
    sent = {**sent, "Bedside-File-Name": quote(file_name, safe="")}
    return await client.post(ATTACHMENTS_URL, params={"thread_id": thread_id}, data=data, headers=sent)


_UPLOADS_IN_FLIGHT = """
    SELECT count(DISTINCT l.pid) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
    WHERE c.relname = 'attachments' AND l.mode = 'RowExclusiveLock' AND l.pid <> pg_backend_pid()
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


async def uploads_in_flight(owner_dsn: str, count: int) -> None:
    """Wait until `count` uploads hold their transaction open (their attachment row written, the body awaited)."""
    watcher = await asyncpg.connect(owner_dsn)
    try:
        for _ in range(250):
            if await watcher.fetchval(_UPLOADS_IN_FLIGHT) == count:
                return
            await asyncio.sleep(0.02)
    finally:
        await watcher.close()
    pytest.fail(f"{count} uploads never held their transaction")


FIRST_CHUNK = 64 * 1024  # what an upload waits for before it takes a connection


async def held(release: asyncio.Event) -> AsyncIterator[bytes]:
    """A portal that sends a first chunk's worth of a PDF (so the upload takes its connection), then
    nothing until `release` is set, then the rest: 2 chunks in all."""
    yield b"%PDF-" + bytes(FIRST_CHUNK)
    await release.wait()
    yield bytes(100)


async def trickle(pieces: int, every: float) -> AsyncIterator[bytes]:
    """A slow portal: the start of a PDF, then a few bytes every `every` seconds, `pieces` times."""
    yield b"%PDF-"
    for _ in range(pieces):
        await asyncio.sleep(every)
        yield b"1234567890"
