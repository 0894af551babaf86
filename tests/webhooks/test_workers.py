"""The delivery worker as an operator runs it: killed mid-delivery, run twice against one database, and
never holding a transaction or a row lock while a receiver takes its time. Real apps (create_app) on the
test's database, a real receiver on loopback that records what is in flight."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
from aiohttp import web

from service.app import create_app
from service.embedded import APP_LOGIN_ROLE
from service.settings import Settings
from tests.api.messaging_helpers import consent, patient, thread
from tests.api.webhook_helpers import ADMIN, Received, Receiver, admin_get, register, wait_for_delivery
from tests.conftest import Dsns, Portals
from tests.support import as_owner


@dataclass
class TrackingReceiver(Receiver):
    """A receiver that also counts, per webhook-id, the requests in flight (the most ever at once), and
    holds every request at `gate` while the gate is closed."""

    in_flight: Counter[str] = field(default_factory=Counter)
    most_at_once: Counter[str] = field(default_factory=Counter)
    started: list[str] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.gate.set()

    async def _handle(self, request: web.Request) -> web.Response:
        webhook_id = request.headers.get("webhook-id", "")
        self.in_flight[webhook_id] += 1
        self.most_at_once[webhook_id] = max(self.most_at_once[webhook_id], self.in_flight[webhook_id])
        self.started.append(webhook_id)
        try:
            await self.gate.wait()
            return await super()._handle(request)
        finally:
            self.in_flight[webhook_id] -= 1


@pytest.fixture
async def tracker() -> AsyncIterator[TrackingReceiver]:
    receiver = TrackingReceiver()
    await receiver.start()
    yield receiver
    receiver.gate.set()
    await receiver.stop()


async def until(condition: Any, within: float = 20.0, what: str = "condition") -> None:
    """Wait until `await condition()` is true; fail after `within` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def owner_fetch(database: Dsns, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database.owner)
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


async def test_killing_the_service_mid_delivery_loses_nothing(
    settings: Settings, portals: Portals, tracker: TrackingReceiver, aiohttp_client: Any, database: Dsns
) -> None:
    """The service dies while its worker has two deliveries in flight (the receiver has them, no answer
    yet): nothing is recorded as done; after a restart (a new app on the same database) the expired
    leases are reaped and both notifications arrive, each attempt now by the new worker.

    The lease is 2.5 s here (production requires timeout + 5 s): compressed like the retry schedule."""
    first = await aiohttp_client(create_app(settings.model_copy(update={"webhook_lease_seconds": 2.5})))
    created = await register(first, portals, tracker.url)
    endpoint_id = created["endpoint"]["id"]
    await consent(first, portals)
    tracker.gate.clear()
    await thread(first, portals, message="in flight when the service dies")

    async def both_in_flight() -> bool:
        return len(set(tracker.started)) == 2

    await until(both_in_flight, what="two deliveries in flight")
    await first.close()  # the whole service stops: its worker is cancelled mid-request
    tracker.gate.set()

    rows = await owner_fetch(database, "SELECT status, lease_owner, attempts FROM webhook_outbox")
    assert [(r["status"], r["lease_owner"] is not None, r["attempts"]) for r in rows] == [("pending", True, 0)] * 2
    dead_owner = rows[0]["lease_owner"]

    async def leases_expired() -> bool:
        expired = await owner_fetch(database, "SELECT bool_and(lease_until < now()) AS done FROM webhook_outbox")
        return bool(expired[0]["done"])

    await until(leases_expired, what="the dead worker's leases to expire")
    second = await aiohttp_client(create_app(settings))
    items = await wait_for_delivery(
        second, portals, endpoint_id, lambda items: len(items) == 2 and all(i["status"] == "succeeded" for i in items)
    )

    assert {i["webhook_id"] for i in items} <= {r.webhook_id for r in tracker.received}
    assert {i["event_type"] for i in items} == {"thread.created", "message.created"}
    assert all(i["attempts"] == 1 for i in items)
    workers = await owner_fetch(database, "SELECT DISTINCT worker FROM webhook_attempts")
    assert len(workers) == 1
    assert workers[0]["worker"] != dead_owner


async def test_a_running_worker_reaps_an_expired_lease_within_its_configured_interval(
    settings: Settings, portals: Portals, receiver: Receiver, aiohttp_client: Any, database: Dsns
) -> None:
    """A worker that died holds one of a thread's two deliveries (message.created) under a long lease. A
    running worker with `webhook_reap_interval_seconds` 0.2 (the default is 10) sends the other one, so it
    has turned at least once, and reaped first, while that lease still ran. When the lease runs out, the
    delivery goes within a few of its reap intervals, not at its next turn's reap 10 s after the first."""
    arranging = await aiohttp_client(create_app(settings.model_copy(update={"webhook_worker": False})))
    created = await register(arranging, portals, receiver.url)
    endpoint_id = created["endpoint"]["id"]
    await consent(arranging, portals)
    await thread(arranging, portals, message="held by a worker that died")
    dead_owner = uuid.uuid4()
    await as_owner(
        database.owner,
        lambda conn: conn.execute(
            "UPDATE webhook_outbox SET lease_owner = $1, lease_until = now() + interval '1 hour' "
            "WHERE event_type = 'message.created'",
            dead_owner,
        ),
    )

    worker = await aiohttp_client(create_app(settings.model_copy(update={"webhook_reap_interval_seconds": 0.2})))
    await wait_for_delivery(
        worker,
        portals,
        endpoint_id,
        lambda items: any(i["event_type"] == "thread.created" and i["status"] == "succeeded" for i in items),
    )
    await as_owner(
        database.owner,
        lambda conn: conn.execute(
            "UPDATE webhook_outbox SET lease_until = now() - interval '1 second' WHERE lease_owner = $1", dead_owner
        ),
    )
    items = await wait_for_delivery(
        worker,
        portals,
        endpoint_id,
        lambda items: len(items) == 2 and all(i["status"] == "succeeded" for i in items),
        within=3,
    )

    assert all(i["attempts"] == 1 for i in items)
    assert sorted(r.json["type"] for r in receiver.received) == ["message.created", "thread.created"]


async def test_two_workers_on_one_database_never_send_a_delivery_twice_at_once(
    settings: Settings, portals: Portals, tracker: TrackingReceiver, aiohttp_client: Any, database: Dsns
) -> None:
    """Two service instances (four deliveries at a time each) share one database and 31 notifications,
    a third of which fail once: no webhook-id is ever in flight twice at once, none is sent more often
    than its failures require, every one arrives, and both workers took part."""
    few = settings.model_copy(update={"webhook_concurrency": 4})
    one = await aiohttp_client(create_app(few))
    two = await aiohttp_client(create_app(few))
    tracker.delay = 0.02
    failed_once: set[str] = set()
    seen: set[str] = set()

    def every_third_fails_once(received: Received) -> tuple[int, dict[str, str]]:
        if received.webhook_id not in seen:
            seen.add(received.webhook_id)
            if len(seen) % 3 == 0:
                failed_once.add(received.webhook_id)
                return 503, {}
        return 200, {}

    tracker.respond = every_third_fails_once
    created = await register(one, portals, tracker.url)
    endpoint_id = created["endpoint"]["id"]
    await consent(one, portals)
    made = await thread(two, portals, message="message 0")
    for n in range(1, 30):
        sender = (one, two)[n % 2]
        sent = await sender.post(
            f"/v1/threads/{made['id']}/messages", json={"body": f"message {n}"}, headers=patient(portals)
        )
        assert sent.status == 201

    items = await wait_for_delivery(
        one,
        portals,
        endpoint_id,
        lambda items: len(items) == 31 and all(i["status"] == "succeeded" for i in items),
        within=30,
    )

    assert max(tracker.most_at_once.values()) == 1
    sent_per_id = Counter(r.webhook_id for r in tracker.received)
    assert set(sent_per_id) == {i["webhook_id"] for i in items}
    assert sent_per_id == Counter({i: 2 if i in failed_once else 1 for i in sent_per_id})
    assert len(failed_once) == 10
    workers = await owner_fetch(database, "SELECT worker, count(*) AS n FROM webhook_attempts GROUP BY worker")
    assert len(workers) == 2, "both workers delivered some"
    assert sum(r["n"] for r in workers) == 41


async def test_no_transaction_or_row_lock_is_held_while_a_receiver_takes_its_time(
    client, portals: Portals, tracker: TrackingReceiver, database: Dsns
) -> None:
    """While a receiver sits on a request, the delivery's row is not locked and no database transaction
    of the service stays open; the admin sees it in flight, and a resend meanwhile is refused (409)."""
    tracker.gate.clear()
    created = await register(client, portals, tracker.url, event_types=["message.created"])
    endpoint_id = created["endpoint"]["id"]
    await consent(client, portals)
    await thread(client, portals)

    async def in_flight() -> bool:
        return len(tracker.started) == 1

    await until(in_flight, what="the delivery to reach the receiver")
    conn = await asyncpg.connect(database.owner)
    try:
        began = await conn.fetchval("SELECT clock_timestamp()")
        [pending] = (await admin_get(client, portals, f"/v1/admin/webhook-endpoints/{endpoint_id}/deliveries"))["items"]
        assert (pending["status"], pending["in_flight"]) == ("pending", True)
        async with conn.transaction():  # would fail at once (lock not available) if the worker held the row
            locked = await conn.fetchval("SELECT id FROM webhook_outbox WHERE id = $1 FOR UPDATE NOWAIT", pending["id"])
        assert str(locked) == pending["id"]
        resend = await client.post(
            f"/v1/admin/webhook-endpoints/{endpoint_id}/deliveries/{pending['id']}/resend",
            headers=portals.acme.auth(**ADMIN),
        )
        assert resend.status == 409
        await asyncio.sleep(0.3)  # longer than any of the service's short transactions takes
        open_since_before = await conn.fetch(
            "SELECT pid, state, query FROM pg_stat_activity WHERE datname = current_database() AND usename = $1 "
            "AND xact_start < $2",
            APP_LOGIN_ROLE,
            began,
        )
        assert open_since_before == []
        assert tracker.received == []
        assert len(tracker.started) == 1
    finally:
        await conn.close()

    tracker.gate.set()
    [done] = await wait_for_delivery(
        client, portals, endpoint_id, lambda items: items[0]["status"] == "succeeded" and not items[0]["in_flight"]
    )
    assert done["attempts"] == 1
    assert len(tracker.received) == 1
