"""Poison deliveries: a delivery that fails on our side before it is sent (its sealed URL or secret does not
open, its payload names no thread id PostgreSQL can read) is a failed attempt like any other, of error
class `internal-error`: retried on the schedule, dead-lettered and audited at its end, shown to the admin.
It does not count against the endpoint, which the receiver kept healthy, and a worker that lost the lease
meanwhile touches nothing. What is not our failure to record: a settlement that raises after the receiver
accepted the delivery, and a database that cannot be reached; both leave the lease to expire.

Most tests drive a dispatcher themselves (leases and the clock in their hands); the last ones run the real
worker of the app. DNS is the outside world where a test needs a hook inside an attempt, and a TCP link
the test can cut stands between a dispatcher and PostgreSQL where it needs an outage."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from structlog.testing import capture_logs

from service.domain.audit import AuditRecorder
from service.domain.consents import ConsentLedger
from service.domain.idempotency import RequestFingerprints
from service.domain.ssrf import IPAddress
from service.domain.webhooks import DeliveryPolicy, Resolver, UrlGuard, WebhookDispatcher
from service.errors import AuditUnavailableError, UnavailableError
from service.logs import drop_unknown_keys, summarize_exception
from service.settings import Settings
from service.store.audit import AuditStore
from service.store.consents import ConsentStore
from service.store.db import Database
from service.store.idempotency import IdempotencyStore
from service.store.webhooks import WebhookStore
from service.workers.http import HttpTransport, system_resolver
from tests.api.messaging_helpers import consent, thread
from tests.api.webhook_helpers import ADMIN, Receiver, admin_get, register, wait_for_delivery
from tests.conftest import Dsns, Portals, Services
from tests.support import DatabaseLink, as_owner, audit_events, unreadable

NO_WORKER = pytest.mark.parametrize("settings", [{"webhook_worker": False}], indirect=True)
NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
SCHEDULE = (60.0, 120.0)


@pytest.fixture
def settings(settings: Settings, request: pytest.FixtureRequest) -> Settings:
    """The webhook test settings, with a test's own overrides (`parametrize("settings", [...], indirect=True)`)."""
    return settings.model_copy(update=getattr(request, "param", {}))


MakeDispatcher = Callable[..., WebhookDispatcher]


@pytest.fixture
async def make_dispatcher(services: Services) -> AsyncIterator[MakeDispatcher]:
    """Build a dispatcher of real parts on the test's database (or the `db` given): the schedule above
    without jitter, a clock stopped at NOW, any disable period and resolver the test asks for."""
    transports: list[HttpTransport] = []

    def make(
        *,
        disable_after: timedelta = timedelta(days=5),
        resolve: Resolver = system_resolver,
        db: Database | None = None,
    ) -> WebhookDispatcher:
        db = db or services.db
        recorder = AuditRecorder(AuditStore(), db)
        transport = HttpTransport(timeout_seconds=2)
        transports.append(transport)
        return WebhookDispatcher(
            db,
            WebhookStore(),
            services.keyring,
            ConsentLedger(
                db, ConsentStore(), IdempotencyStore(), recorder, fingerprints=RequestFingerprints(services.keyring)
            ),
            recorder,
            transport,
            UrlGuard(resolve, allow_http_loopback=True),
            policy=DeliveryPolicy(schedule=SCHEDULE, jitter=0.0, disable_after=disable_after),
            clock=lambda: NOW,
        )

    yield make
    for transport in transports:
        await transport.close()


async def flip_last_bit(database: Dsns, select: str, update: str, endpoint_id: str) -> None:
    async def flip(conn: asyncpg.Connection) -> None:
        sealed = bytearray(await conn.fetchval(select, uuid.UUID(endpoint_id)))
        sealed[-1] ^= 0x01
        await conn.execute(update, uuid.UUID(endpoint_id), bytes(sealed))

    await as_owner(database.owner, flip)


async def corrupt_url(database: Dsns, endpoint_id: str) -> None:
    """The endpoint's sealed URL, one bit flipped: it no longer opens (DecryptionError)."""
    await flip_last_bit(
        database,
        "SELECT url FROM webhook_endpoints WHERE id = $1",
        "UPDATE webhook_endpoints SET url = $2 WHERE id = $1",
        endpoint_id,
    )


async def corrupt_outbound_secret(database: Dsns, endpoint_id: str) -> None:
    """The endpoint's sealed outbound secret, one bit flipped: it no longer opens (DecryptionError)."""
    where = "WHERE endpoint_id = $1 AND purpose = 'outbound'"
    await flip_last_bit(
        database,
        f"SELECT secret FROM webhook_endpoint_keys {where}",  # noqa: S608
        f"UPDATE webhook_endpoint_keys SET secret = $2 {where}",  # noqa: S608
        endpoint_id,
    )


async def break_thread_id(database: Dsns, endpoint_id: str) -> None:
    """Deliveries written from now on name a thread id PostgreSQL cannot cast to a uuid: reading the work
    raises. (A trigger, so the delivery is poisoned from its first moment; `drop_trigger` removes it.)"""
    await as_owner(
        database.owner,
        lambda conn: conn.execute(
            """
            CREATE FUNCTION test_break_thread_id() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                NEW.payload := jsonb_set(NEW.payload, '{thread_id}', '"not-a-thread"');
                RETURN NEW;
            END $$;
            CREATE TRIGGER test_break_thread_id BEFORE INSERT ON webhook_outbox
                FOR EACH ROW EXECUTE FUNCTION test_break_thread_id();
            """
        ),
    )


async def refuse_delivered_audit(database: Dsns, endpoint_id: str) -> None:
    """The audit log refuses `webhook:deliver` events: settling a successful attempt raises."""
    await as_owner(
        database.owner,
        lambda conn: conn.execute(
            """
            CREATE FUNCTION test_refuse_deliver() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.action = 'webhook:deliver' THEN
                    RAISE EXCEPTION 'refused by the test';
                END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER test_refuse_deliver BEFORE INSERT ON audit_outbox
                FOR EACH ROW EXECUTE FUNCTION test_refuse_deliver();
            """
        ),
    )


async def drop_trigger(database: Dsns, name: str, table: str) -> None:
    """Remove a trigger (and its function) that a poison above installed."""
    await as_owner(
        database.owner,
        lambda conn: conn.execute(f"DROP TRIGGER {name} ON {table}; DROP FUNCTION {name}()"),
    )


async def outbox_row(database: Dsns, delivery_id: uuid.UUID) -> asyncpg.Record:
    return await as_owner(
        database.owner,
        lambda conn: conn.fetchrow(
            "SELECT status, tries, attempts, next_attempt_at, lease_owner, lease_until, last_attempt_at, "
            "last_status_code FROM webhook_outbox WHERE id = $1",
            delivery_id,
        ),
    )


async def attempt_rows(database: Dsns, delivery_id: uuid.UUID) -> list[asyncpg.Record]:
    return await as_owner(
        database.owner,
        lambda conn: conn.fetch(
            "SELECT attempt, attempted_at, status_code, error_class, worker FROM webhook_attempts "
            "WHERE delivery_id = $1 ORDER BY attempt",
            delivery_id,
        ),
    )


async def endpoint_health(database: Dsns, endpoint_id: str) -> tuple[Any, ...]:
    row = await as_owner(
        database.owner,
        lambda conn: conn.fetchrow(
            "SELECT failing_since, disabled_at, disabled_reason FROM webhook_endpoints WHERE id = $1",
            uuid.UUID(endpoint_id),
        ),
    )
    return tuple(row)


async def dead_letters(database: Dsns) -> list[asyncpg.Record]:
    return await audit_events(database.owner, "action = 'webhook:dead_letter'")


async def holds(database: Dsns) -> list[asyncpg.Record]:
    return await audit_events(database.owner, "action = 'webhook:hold'")


async def admin_post(client: Any, portals: Portals, path: str) -> Any:
    response = await client.post(path, headers=portals.acme.auth(**ADMIN))
    assert response.status == 200, await response.text()
    return await response.json()


async def make_due(database: Dsns, delivery_id: uuid.UUID) -> None:
    """Time passes: the retry is due now."""
    await as_owner(
        database.owner,
        lambda conn: conn.execute("UPDATE webhook_outbox SET next_attempt_at = now() WHERE id = $1", delivery_id),
    )


async def expire_lease(database: Dsns, delivery_id: uuid.UUID) -> None:
    """Time passes: the delivery's lease has run out (the reaper may return it)."""
    await as_owner(
        database.owner,
        lambda conn: conn.execute(
            "UPDATE webhook_outbox SET lease_until = now() - interval '1 second' WHERE id = $1", delivery_id
        ),
    )


async def one_delivery(
    client: Any,
    portals: Portals,
    receiver: Receiver,
    url: str | None = None,
    *,
    before: Callable[[str], Awaitable[None]] | None = None,
) -> str:
    """An endpoint for message.created, consent, and a thread whose first message makes one delivery.
    `before(endpoint_id)` runs once the endpoint exists and before the delivery does: a worker running
    meanwhile can never see the delivery as it was before `before` poisoned it."""
    created = await register(client, portals, url or receiver.url, event_types=["message.created"])
    endpoint_id: str = created["endpoint"]["id"]
    if before is not None:
        await before(endpoint_id)
    await consent(client, portals)
    await thread(client, portals)
    return endpoint_id


@NO_WORKER
async def test_a_delivery_whose_url_does_not_open_is_retried_on_the_schedule_without_blaming_the_endpoint(
    client, portals: Portals, receiver: Receiver, database: Dsns, make_dispatcher: MakeDispatcher
) -> None:
    """The endpoint's sealed URL no longer opens: the attempt is recorded (`internal-error`, no status
    code), the delivery is due again after the schedule's first step and released by this worker, the
    admin sees the attempt; the endpoint's failing period does not start; the log names the exception's
    type only; nothing was sent."""
    endpoint_id = await one_delivery(client, portals, receiver)
    await corrupt_url(database, endpoint_id)
    dispatcher = make_dispatcher()
    owner = uuid.uuid4()
    [(tenant_id, delivery_id)] = await dispatcher.claim(owner, 30.0, 10)

    with capture_logs() as logs:
        assert await dispatcher.deliver(owner, tenant_id, delivery_id) == "retry"

    row = await outbox_row(database, delivery_id)
    assert (row["status"], row["tries"], row["attempts"]) == ("pending", 1, 1)
    assert row["next_attempt_at"] == NOW + timedelta(seconds=SCHEDULE[0])
    assert (row["lease_owner"], row["lease_until"]) == (None, None)
    assert (row["last_attempt_at"], row["last_status_code"]) == (NOW, None)
    [attempt] = await attempt_rows(database, delivery_id)
    assert (attempt["attempt"], attempt["attempted_at"], attempt["status_code"], attempt["error_class"]) == (
        1,
        NOW,
        None,
        "internal-error",
    )
    assert attempt["worker"] == owner
    assert await endpoint_health(database, endpoint_id) == (None, None, None)
    assert receiver.received == []

    view = await admin_get(client, portals, f"/v1/admin/webhook-endpoints/{endpoint_id}/deliveries/{delivery_id}")
    assert (view["status"], view["attempts"], view["in_flight"]) == ("pending", 1, False)
    assert [(a["attempt"], a["status_code"], a["error_class"]) for a in view["attempt_log"]] == [
        (1, None, "internal-error")
    ]

    [event] = [dict(e) for e in logs if e["event"] == "webhook.attempt"]
    assert event.pop("log_level") == "error"  # the capture's own key
    logged = drop_unknown_keys(None, "error", summarize_exception(None, "error", event))
    assert re.fullmatch(r"\w+\.py:\d+:\w+", logged.pop("error_at"))  # where it was raised: a code location
    assert logged == {
        "event": "webhook.attempt",
        "delivery_id": str(delivery_id),
        "endpoint_id": endpoint_id,
        "attempt": 1,
        "error_class": "internal-error",
        "duration_ms": 0,
        "outcome": "retry",
        "error_type": "DecryptionError",
    }


@NO_WORKER
async def test_after_the_last_step_a_poison_delivery_is_dead_lettered_and_audited_and_the_endpoint_stays_enabled(
    client, portals: Portals, receiver: Receiver, database: Dsns, make_dispatcher: MakeDispatcher
) -> None:
    """Each attempt fails on our side: after the schedule's two steps the third failure dead-letters it,
    audited as `webhook:dead_letter` with the patient it concerns. The endpoint is neither marked failing
    nor disabled, although this dispatcher disables an endpoint at its first failure of its own."""
    endpoint_id = await one_delivery(client, portals, receiver)
    await corrupt_url(database, endpoint_id)
    dispatcher = make_dispatcher(disable_after=timedelta(0))
    owner = uuid.uuid4()

    outcomes = []
    for _ in range(3):
        [(tenant_id, delivery_id)] = await dispatcher.claim(owner, 30.0, 10)
        outcomes.append(await dispatcher.deliver(owner, tenant_id, delivery_id))
        await make_due(database, delivery_id)
    assert outcomes == ["retry", "retry", "dead"]
    assert await dispatcher.claim(owner, 30.0, 10) == []

    row = await outbox_row(database, delivery_id)
    assert (row["status"], row["tries"], row["attempts"], row["lease_owner"]) == ("dead", 3, 3, None)
    attempts = await attempt_rows(database, delivery_id)
    assert [(a["attempt"], a["status_code"], a["error_class"]) for a in attempts] == [
        (1, None, "internal-error"),
        (2, None, "internal-error"),
        (3, None, "internal-error"),
    ]
    [letter] = await dead_letters(database)
    assert (letter["resource_id"], letter["patient"]) == (str(delivery_id), "Patient/1")
    assert json.loads(letter["details"]) == {
        "subscriber": "Practitioner/7",
        "endpoint_id": endpoint_id,
        "event_type": "message.created",
        "attempt": 3,
        "error_class": "internal-error",
    }
    assert await endpoint_health(database, endpoint_id) == (None, None, None)
    view = await admin_get(client, portals, f"/v1/admin/webhook-endpoints/{endpoint_id}/deliveries/{delivery_id}")
    assert (view["status"], view["next_attempt_at"]) == ("dead", None)
    assert [a["error_class"] for a in view["attempt_log"]] == ["internal-error"] * 3
    assert receiver.received == []


@NO_WORKER
async def test_a_worker_that_lost_the_lease_before_failing_leaves_the_delivery_to_its_new_holder(
    client, portals: Portals, receiver: Receiver, database: Dsns, make_dispatcher: MakeDispatcher
) -> None:
    """DNS hangs past the lease, another worker leases the delivery meanwhile, then the lookup fails in a
    way nobody foresaw: the stalled worker records nothing and settles nothing."""
    endpoint_id = await one_delivery(client, portals, receiver, f"http://localhost:{receiver.port}/hooks")
    stalled, current = uuid.uuid4(), uuid.uuid4()
    delivery: list[uuid.UUID] = []

    async def stuck_then_broken(host: str, port: int) -> Sequence[IPAddress]:
        await as_owner(
            database.owner,
            lambda conn: conn.execute("UPDATE webhook_outbox SET lease_owner = $1 WHERE id = $2", current, delivery[0]),
        )
        raise RuntimeError("a resolver bug")

    dispatcher = make_dispatcher(resolve=stuck_then_broken)
    [(tenant_id, delivery_id)] = await dispatcher.claim(stalled, 30.0, 10)
    delivery.append(delivery_id)
    before = await outbox_row(database, delivery_id)

    assert await dispatcher.deliver(stalled, tenant_id, delivery_id) == "lost"

    after = await outbox_row(database, delivery_id)
    assert after["lease_owner"] == current
    assert dict(after) == {**dict(before), "lease_owner": current}
    assert (after["status"], after["tries"], after["attempts"]) == ("pending", 0, 0)
    assert await attempt_rows(database, delivery_id) == []
    assert await dead_letters(database) == []
    assert await endpoint_health(database, endpoint_id) == (None, None, None)
    assert receiver.received == []


@NO_WORKER
async def test_a_poison_delivery_of_a_disabled_endpoint_is_held_like_its_others_not_dead_lettered(
    client, portals: Portals, receiver: Receiver, database: Dsns, make_dispatcher: MakeDispatcher
) -> None:
    """A delivery whose thread id does not read fails before the dispatcher learns anything of its
    endpoint. After two such failures the admin disables the endpoint while the delivery is leased; the
    third failure, the schedule's last, is recorded but does not dead-letter it: it is held for
    `endpoint-disabled` (audited `webhook:hold`), as every delivery of a disabled endpoint is, and enabling
    the endpoint releases it for a new pass through the schedule."""
    endpoint_id = await one_delivery(client, portals, receiver, before=lambda e: break_thread_id(database, e))
    dispatcher = make_dispatcher()
    owner = uuid.uuid4()
    outcomes = []
    for _ in range(3):
        [(tenant_id, delivery_id)] = await dispatcher.claim(owner, 30.0, 10)
        if len(outcomes) == 2:
            await admin_post(client, portals, f"/v1/admin/webhook-endpoints/{endpoint_id}/disable")
        outcomes.append(await dispatcher.deliver(owner, tenant_id, delivery_id))
        await make_due(database, delivery_id)
    assert outcomes == ["retry", "retry", "held"]

    view = await admin_get(client, portals, f"/v1/admin/webhook-endpoints/{endpoint_id}/deliveries/{delivery_id}")
    assert (view["status"], view["held_reason"], view["in_flight"]) == ("held", "endpoint-disabled", False)
    assert [a["error_class"] for a in view["attempt_log"]] == ["internal-error"] * 3
    assert await dead_letters(database) == []
    [hold] = await holds(database)
    assert hold["resource_id"] == str(delivery_id)
    assert json.loads(hold["details"]) == {
        "subscriber": "Practitioner/7",
        "endpoint_id": endpoint_id,
        "event_type": "message.created",
        "held_reason": "endpoint-disabled",
        "attempt": 3,
        "error_class": "internal-error",
    }
    failing_since, disabled_at, disabled_reason = await endpoint_health(database, endpoint_id)
    assert (failing_since, disabled_at is not None, disabled_reason) == (None, True, "admin")  # not "failing"

    enabled = await admin_post(client, portals, f"/v1/admin/webhook-endpoints/{endpoint_id}/enable")
    assert enabled["released"] == 1
    row = await outbox_row(database, delivery_id)
    assert (row["status"], row["tries"], row["attempts"]) == ("pending", 0, 3)
    assert receiver.received == []


@NO_WORKER
async def test_a_delivery_whose_key_file_cannot_be_read_is_an_internal_error_attempt_not_an_outage(
    client,
    portals: Portals,
    receiver: Receiver,
    database: Dsns,
    kek_file: Path,
    make_dispatcher: MakeDispatcher,
) -> None:
    """Opening the endpoint's sealed URL needs the KEK file, which this dispatcher's keyring has not read
    for it yet, and the file cannot be read (ELOOP: a symlink to itself, which root cannot read past
    either): the provider's KeyProviderError, naming the file and the reason rather than a bare OSError,
    raised inside the attempt's database transaction. That is our failure, not the
    database's: an `internal-error` attempt, retried on the schedule and released by this worker, rather
    than an outage that leaves the delivery leased for the reaper to hand out again, forever."""
    endpoint_id = await one_delivery(client, portals, receiver)
    dispatcher = make_dispatcher()
    owner = uuid.uuid4()
    [(tenant_id, delivery_id)] = await dispatcher.claim(owner, 30.0, 10)
    with unreadable(kek_file), capture_logs() as logs:
        assert await dispatcher.deliver(owner, tenant_id, delivery_id) == "retry"

    row = await outbox_row(database, delivery_id)
    assert (row["status"], row["tries"], row["attempts"], row["lease_owner"]) == ("pending", 1, 1, None)
    assert [(a["attempt"], a["status_code"], a["error_class"]) for a in await attempt_rows(database, delivery_id)] == [
        (1, None, "internal-error")
    ]
    [event] = [dict(e) for e in logs if e["event"] == "webhook.attempt"]
    assert summarize_exception(None, "error", event)["error_type"] == "KeyProviderError"
    assert await endpoint_health(database, endpoint_id) == (None, None, None)
    assert receiver.received == []


@NO_WORKER
async def test_a_delivery_the_receiver_accepted_whose_settlement_raises_is_left_to_the_reaper_not_failed(
    client, portals: Portals, receiver: Receiver, database: Dsns, make_dispatcher: MakeDispatcher
) -> None:
    """The receiver answers 200 but recording the success fails (its `webhook:deliver` audit event is
    refused): the error propagates and nothing is recorded, neither an `internal-error` attempt nor a dead
    letter, and the endpoint stays healthy. The delivery stays leased; when the lease runs out the reaper
    returns it and it goes again with the same webhook-id (at least once), recorded as delivered."""
    endpoint_id = await one_delivery(client, portals, receiver, before=lambda e: refuse_delivered_audit(database, e))
    dispatcher = make_dispatcher()
    owner = uuid.uuid4()
    [(tenant_id, delivery_id)] = await dispatcher.claim(owner, 30.0, 10)

    with pytest.raises(AuditUnavailableError):
        await dispatcher.deliver(owner, tenant_id, delivery_id)

    [sent] = receiver.received
    row = await outbox_row(database, delivery_id)
    assert (row["status"], row["tries"], row["attempts"], row["lease_owner"]) == ("pending", 0, 0, owner)
    assert row["lease_until"] is not None
    assert await attempt_rows(database, delivery_id) == []
    assert await dead_letters(database) == []
    assert await endpoint_health(database, endpoint_id) == (None, None, None)

    await drop_trigger(database, "test_refuse_deliver", "audit_outbox")
    await expire_lease(database, delivery_id)
    assert await dispatcher.reap() == 1
    again = uuid.uuid4()
    assert await dispatcher.claim(again, 30.0, 10) == [(tenant_id, delivery_id)]
    assert await dispatcher.deliver(again, tenant_id, delivery_id) == "succeeded"

    assert [r.webhook_id for r in receiver.received] == [sent.webhook_id] * 2
    assert [(a["attempt"], a["status_code"], a["error_class"]) for a in await attempt_rows(database, delivery_id)] == [
        (1, 200, None)
    ]
    view = await admin_get(client, portals, f"/v1/admin/webhook-endpoints/{endpoint_id}/deliveries/{delivery_id}")
    assert view["status"] == "succeeded"


async def _left_to_its_lease_then_delivered(
    database: Dsns,
    dispatcher: WebhookDispatcher,
    receiver: Receiver,
    endpoint_id: str,
    owner: uuid.UUID,
    tenant_id: uuid.UUID,
    delivery_id: uuid.UUID,
) -> None:
    """What an outage leaves: the delivery still leased to `owner`, no attempt used up, nothing sent. Once the
    lease has run out the reaper returns it, and it goes as its first attempt, its endpoint unmarked."""
    row = await outbox_row(database, delivery_id)
    assert (row["status"], row["tries"], row["attempts"], row["lease_owner"]) == ("pending", 0, 0, owner)
    assert await attempt_rows(database, delivery_id) == []
    assert receiver.received == []

    await expire_lease(database, delivery_id)
    assert await dispatcher.reap() == 1
    assert await dispatcher.claim(owner, 30.0, 10) == [(tenant_id, delivery_id)]
    assert await dispatcher.deliver(owner, tenant_id, delivery_id) == "succeeded"
    assert [(a["attempt"], a["status_code"]) for a in await attempt_rows(database, delivery_id)] == [(1, 200)]
    assert len(receiver.received) == 1
    assert await endpoint_health(database, endpoint_id) == (None, None, None)


@NO_WORKER
async def test_a_database_outage_before_the_request_uses_up_no_attempt(
    client, portals: Portals, receiver: Receiver, database: Dsns, make_dispatcher: MakeDispatcher
) -> None:
    """The dispatcher's connection to PostgreSQL is cut as the attempt begins and its reconnection
    refused, as in a failover; the next connection goes through. The attempt raises `UnavailableError`
    instead of recording our failure: no attempt is used up and nothing is sent; the lease runs out, the
    reaper returns the delivery, and it goes as its first attempt."""
    endpoint_id = await one_delivery(client, portals, receiver)
    link = DatabaseLink(database.app)
    await link.start()
    pool = await asyncpg.create_pool(link.dsn, min_size=1, max_size=1)
    try:
        dispatcher = make_dispatcher(db=Database(pool, link.dsn, {}))
        owner = uuid.uuid4()
        [(tenant_id, delivery_id)] = await dispatcher.claim(owner, 30.0, 10)
        link.outage()
        await pool.expire_connections()  # the pool reconnects at once, rather than find out on first use

        with pytest.raises(UnavailableError):
            await dispatcher.deliver(owner, tenant_id, delivery_id)

        await _left_to_its_lease_then_delivered(
            database, dispatcher, receiver, endpoint_id, owner, tenant_id, delivery_id
        )
    finally:
        await pool.close()
        await link.close()


@NO_WORKER
async def test_a_failover_that_ended_the_dispatchers_idle_connection_costs_the_delivery_nothing(
    client, portals: Portals, receiver: Receiver, database: Dsns, make_dispatcher: MakeDispatcher
) -> None:
    """The server ends the dispatcher's pooled connection while it sits idle, as a failover ends every
    session; its FATAL error has arrived, its closing not yet, so the driver trips on the next statement
    (asyncpg's InternalClientError). That statement is the attempt's BEGIN, which goes again on a fresh
    connection: the delivery goes at once as its first attempt, neither recorded as our failure nor left to
    the reaper, and the endpoint is unmarked."""
    endpoint_id = await one_delivery(client, portals, receiver)
    link = DatabaseLink(database.app)
    await link.start()
    db = await Database.connect(link.dsn, min_size=1, max_size=1)
    try:
        dispatcher = make_dispatcher(db=db)
        owner = uuid.uuid4()
        [(tenant_id, delivery_id)] = await dispatcher.claim(owner, 30.0, 10)
        backend = await db.fetch_value("SELECT pg_backend_pid()")
        await link.end_idle(database.owner, backend)

        assert await dispatcher.deliver(owner, tenant_id, delivery_id) == "succeeded"

        assert [(a["attempt"], a["status_code"]) for a in await attempt_rows(database, delivery_id)] == [(1, 200)]
        assert len(receiver.received) == 1
        assert await endpoint_health(database, endpoint_id) == (None, None, None)
    finally:
        await db.close()
        await link.close()


# -- the real worker --------------------------------------------------------------------------------


@pytest.mark.parametrize("poison", [corrupt_outbound_secret, break_thread_id])
async def test_the_worker_dead_letters_a_poison_delivery_on_the_schedule_instead_of_retrying_it_forever(
    client,
    portals: Portals,
    receiver: Receiver,
    database: Dsns,
    poison: Callable[[Dsns, str], Awaitable[None]],
) -> None:
    """A secret that does not open, or a payload whose thread id does not read, from the delivery's first
    moment: the app's worker records each failure, retries on the (compressed) schedule and dead-letters
    the delivery well before its lease (10 s) would even expire; the endpoint stays healthy and nothing was
    sent."""
    endpoint_id = await one_delivery(client, portals, receiver, before=lambda e: poison(database, e))

    [dead] = await wait_for_delivery(
        client, portals, endpoint_id, lambda items: len(items) == 1 and items[0]["status"] == "dead", within=8
    )

    view = await admin_get(client, portals, f"/v1/admin/webhook-endpoints/{endpoint_id}/deliveries/{dead['id']}")
    assert [(a["status_code"], a["error_class"]) for a in view["attempt_log"]] == [(None, "internal-error")] * 4
    [letter] = await dead_letters(database)
    assert letter["resource_id"] == dead["id"]
    assert await endpoint_health(database, endpoint_id) == (None, None, None)
    assert receiver.received == []
