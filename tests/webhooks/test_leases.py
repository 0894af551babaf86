"""A worker sends only what it still holds: the lease is checked again right before the attempt."""

from __future__ import annotations

import uuid
from datetime import timedelta

import asyncpg
import pytest

from service.domain.audit import AuditRecorder
from service.domain.consents import ConsentLedger
from service.domain.idempotency import RequestFingerprints
from service.domain.webhooks import UrlGuard, WebhookDispatcher
from service.settings import Settings
from service.store.audit import AuditStore
from service.store.consents import ConsentStore
from service.store.idempotency import IdempotencyStore
from service.store.webhooks import WebhookStore
from service.workers.http import HttpTransport, system_resolver
from tests.api.messaging_helpers import consent, thread
from tests.api.webhook_helpers import Receiver, register
from tests.conftest import Dsns, Portals, Services


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # No worker in the app: this test drives a dispatcher itself, with leases it controls.
    return settings.model_copy(update={"webhook_worker": False})


async def test_a_delivery_whose_lease_passed_to_another_worker_is_not_sent(
    client, portals: Portals, receiver: Receiver, services: Services, database: Dsns
) -> None:
    await register(client, portals, receiver.url, event_types=["message.created"])
    await consent(client, portals)
    await thread(client, portals)
    recorder = AuditRecorder(AuditStore(), services.db)
    transport = HttpTransport(timeout_seconds=2)
    dispatcher = WebhookDispatcher(
        services.db,
        WebhookStore(),
        services.keyring,
        ConsentLedger(
            services.db,
            ConsentStore(),
            IdempotencyStore(),
            recorder,
            fingerprints=RequestFingerprints(services.keyring),
        ),
        recorder,
        transport,
        UrlGuard(system_resolver, allow_http_loopback=True),
    )
    try:
        stalled, current = uuid.uuid4(), uuid.uuid4()
        [(tenant_id, delivery_id)] = await dispatcher.claim(stalled, 30.0, 10)
        owner = await asyncpg.connect(database.owner)
        try:  # the stalled worker's lease expired and another worker leased the delivery meanwhile
            await owner.execute("UPDATE webhook_outbox SET lease_owner = $1 WHERE id = $2", current, delivery_id)
        finally:
            await owner.close()

        assert await dispatcher.deliver(stalled, tenant_id, delivery_id) == "lost"
        assert receiver.received == []
        assert await dispatcher.deliver(current, tenant_id, delivery_id) == "succeeded"
        assert len(receiver.received) == 1
    finally:
        await transport.close()


CLAIM = "SELECT tenant_id, id FROM bedside_webhook_claim($1, $2, 10)"
LEASES = "SELECT lease_owner, lease_until - now() AS left FROM webhook_outbox WHERE lease_owner IS NOT NULL"


@pytest.mark.parametrize("lease", [100 * 365 * 86_400.0, 3600.5, 0.0, -60.0, float("nan"), float("inf"), None])
async def test_the_claim_function_refuses_a_lease_outside_one_second_to_one_hour(
    client, portals: Portals, receiver: Receiver, database: Dsns, lease: float | None
) -> None:
    """The claim crosses tenants as its owner (SECURITY DEFINER): the application role, which may call it,
    must not lease every due delivery for a century (or forever) with one call."""
    await register(client, portals, receiver.url, event_types=["message.created"])
    await consent(client, portals)
    await thread(client, portals)
    app, owner = await asyncpg.connect(database.app), await asyncpg.connect(database.owner)
    try:
        with pytest.raises(asyncpg.exceptions.InvalidParameterValueError):
            await app.fetch(CLAIM, uuid.uuid4(), lease)
        assert await owner.fetch(LEASES) == []

        # The longest lease allowed still leases, for no longer than an hour.
        worker = uuid.uuid4()
        assert len(await app.fetch(CLAIM, worker, 3600.0)) == 1
        [(leased_by, left)] = await owner.fetch(LEASES)
        assert leased_by == worker
        assert left <= timedelta(hours=1)
    finally:
        await app.close()
        await owner.close()


@pytest.mark.parametrize("limit", [0, -1, 1001, 2**31 - 1, None])
async def test_the_claim_function_refuses_to_lease_more_than_a_thousand_deliveries_or_no_limit(
    client, portals: Portals, receiver: Receiver, database: Dsns, limit: int | None
) -> None:
    """One call of the cross-tenant claim must not lease every due delivery of every tenant (`LIMIT NULL`
    is no limit at all)."""
    await register(client, portals, receiver.url, event_types=["message.created"])
    await consent(client, portals)
    await thread(client, portals)
    claim = "SELECT tenant_id, id FROM bedside_webhook_claim($1, 60, $2)"
    app, owner = await asyncpg.connect(database.app), await asyncpg.connect(database.owner)
    try:
        with pytest.raises(asyncpg.exceptions.InvalidParameterValueError):
            await app.fetch(claim, uuid.uuid4(), limit)
        assert await owner.fetch(LEASES) == []
        assert len(await app.fetch(claim, uuid.uuid4(), 1000)) == 1
    finally:
        await app.close()
        await owner.close()
