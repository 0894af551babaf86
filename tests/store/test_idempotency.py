"""Idempotency keys in the store: a new key is claimed in one statement, an expired one is claimed anew,
and expired keys of every tenant are purged by the worker, not by each request."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest
from asyncpg.connection import LoggedQuery

from service.store.db import Database, Tx
from service.store.idempotency import IdempotencyClaim, IdempotencyStore, StoredResponse
from service.workers.maintenance import IdempotencyPurger
from tests.conftest import Dsns, Portals
from tests.support import as_owner, blocked_by


@pytest.fixture
async def db(database: Dsns) -> AsyncIterator[Database]:
    """The application's pool on the test's database, as the service's role."""
    pool = await Database.connect(database.app, min_size=1, max_size=2)
    yield pool
    await pool.close()


async def _tenants(owner_dsn: str) -> tuple[uuid.UUID, uuid.UUID]:
    rows = await as_owner(owner_dsn, lambda conn: conn.fetch("SELECT slug, id FROM tenants"))
    ids = {row["slug"]: row["id"] for row in rows}
    return ids["acme"], ids["globex"]


async def _expire(owner_dsn: str, keys: list[str]) -> None:
    statement = "UPDATE idempotency_keys SET expires_at = now() - interval '1 second' WHERE key = ANY($1)"
    await as_owner(owner_dsn, lambda conn: conn.execute(statement, keys))


@pytest.mark.parametrize("with_outcome", [False, True], ids=["completed-after", "outcome-with-the-claim"])
async def test_a_new_key_is_claimed_in_one_statement_and_a_stored_one_replays(
    database: Dsns, portals: Portals, db: Database, with_outcome: bool
) -> None:
    """A new key costs one INSERT, which neither deletes nor updates. A request whose response is known
    before its work (a send: the message's id) claims the key with it, and is not completed afterwards;
    one whose response comes from its work completes the key. A retry after the commit replays it."""
    acme, _ = await _tenants(database.owner)
    store, sent = IdempotencyStore(), []

    def note(query: LoggedQuery) -> None:
        sent.append(query.query)

    outcome = (201, {"id": "x"})
    async with db.transaction(acme) as tx:
        with tx.conn.query_logger(note):
            claim = IdempotencyClaim("Patient/1", "k-1", b"first", outcome if with_outcome else None)
            assert await store.claim(tx, acme, claim) is None
        if not with_outcome:
            await store.complete(tx, acme, "Patient/1", "k-1", *outcome)
    async with db.transaction(acme) as tx:
        stored = await store.claim(tx, acme, IdempotencyClaim("Patient/1", "k-1", b"second", (201, {"id": "y"})))
    status = await as_owner(
        database.owner, lambda conn: conn.fetchval("SELECT status FROM idempotency_keys WHERE key = 'k-1'")
    )
    assert len(sent) == 1, sent
    assert "DELETE" not in sent[0], sent
    assert stored == StoredResponse(request_hash=b"first", response={"id": "x"})
    assert status == 201


async def test_a_claim_with_its_outcome_rolled_back_leaves_no_trace(
    database: Dsns, portals: Portals, db: Database
) -> None:
    """The response is kept with the claim before the work is done, so the claim must go with the work:
    a request that fails rolls both back, and its retry does the work instead of replaying a response
    that names nothing."""
    acme, _ = await _tenants(database.owner)
    store = IdempotencyStore()

    async def fails() -> None:
        async with db.transaction(acme) as tx:
            assert await store.claim(tx, acme, IdempotencyClaim("Patient/1", "k-3", b"h", (201, {"id": "m"}))) is None
            raise RuntimeError("the work failed")

    with pytest.raises(RuntimeError):
        await fails()
    async with db.transaction(acme) as tx:
        assert await store.claim(tx, acme, IdempotencyClaim("Patient/1", "k-3", b"h", (201, {"id": "n"}))) is None


async def test_a_concurrent_claim_waits_for_the_outcome_and_replays_it(
    database: Dsns, portals: Portals, db: Database
) -> None:
    """A second request with the key waits on the first one's claim until it commits, then replays the
    response that first claim carried: it never sees the key without its response."""
    acme, _ = await _tenants(database.owner)
    store = IdempotencyStore()
    async with db.transaction(acme) as first:
        claim = IdempotencyClaim("Patient/1", "race-2", b"first", (201, {"id": "m"}))
        assert await store.claim(first, acme, claim) is None
        again = IdempotencyClaim("Patient/1", "race-2", b"second", (201, {"id": "n"}))
        second = await _blocked_behind(database.owner, first, _in_own_transaction(db, acme, store.claim, again))
    stored = await asyncio.wait_for(second, 10)
    assert stored == StoredResponse(request_hash=b"first", response={"id": "m"})


async def _in_own_transaction(
    db: Database,
    tenant: uuid.UUID,
    work: Callable[[Tx, uuid.UUID, IdempotencyClaim], Awaitable[StoredResponse | None]],
    claim: IdempotencyClaim,
) -> StoredResponse | None:
    async with db.transaction(tenant) as tx:
        return await work(tx, tenant, claim)


async def _blocked_behind(
    owner_dsn: str, first: Tx, work: Awaitable[StoredResponse | None]
) -> asyncio.Task[StoredResponse | None]:
    """`work` started, once it waits for `first`'s transaction (on its claim's unique index entry)."""
    task = asyncio.ensure_future(work)
    try:
        await as_owner(owner_dsn, lambda conn: blocked_by(conn, first.conn.get_server_pid()))
    except BaseException:
        task.cancel()
        raise
    assert not task.done()
    return task


async def test_an_expired_key_is_claimed_anew(database: Dsns, portals: Portals, db: Database) -> None:
    acme, _ = await _tenants(database.owner)
    store = IdempotencyStore()
    async with db.transaction(acme) as tx:
        assert await store.claim(tx, acme, IdempotencyClaim("Patient/1", "old", b"first")) is None
    await _expire(database.owner, ["old"])
    async with db.transaction(acme) as tx:
        assert await store.claim(tx, acme, IdempotencyClaim("Patient/1", "old", b"second")) is None
    async with db.transaction(acme) as tx:
        stored = await store.claim(tx, acme, IdempotencyClaim("Patient/1", "old", b"third"))
    assert stored is not None
    assert stored.request_hash == b"second"


async def test_a_key_found_taken_and_then_purged_is_claimed_anew(
    database: Dsns, portals: Portals, db: Database
) -> None:
    """`on_record` follows a claim that found the key taken. If the key has gone since (expired and
    purged), this request claims it: it does not answer "in use"."""
    acme, _ = await _tenants(database.owner)
    store = IdempotencyStore()
    async with db.transaction(acme) as tx:
        assert await store.on_record(tx, acme, IdempotencyClaim("Patient/1", "purged", b"mine")) is None
    async with db.transaction(acme) as tx:
        stored = await store.claim(tx, acme, IdempotencyClaim("Patient/1", "purged", b"later"))
    assert stored is not None
    assert stored.request_hash == b"mine"


async def test_a_key_claimed_concurrently_between_the_statements_replays_the_first_request(
    database: Dsns, portals: Portals, db: Database
) -> None:
    """A request that finds no row, then meets another request's claim of the same key, waits for it to
    commit and hands back what it stored: never a second claim of one key, and no needless "in use"."""
    acme, _ = await _tenants(database.owner)
    store = IdempotencyStore()
    async with db.transaction(acme) as first:
        assert await store.claim(first, acme, IdempotencyClaim("Patient/1", "race", b"first")) is None
        again = IdempotencyClaim("Patient/1", "race", b"second")
        second = await _blocked_behind(database.owner, first, _in_own_transaction(db, acme, store.on_record, again))
        await store.complete(first, acme, "Patient/1", "race", 201, {"id": "x"})
    stored = await asyncio.wait_for(second, 10)
    assert stored == StoredResponse(request_hash=b"first", response={"id": "x"})


async def test_the_purge_deletes_expired_keys_of_every_tenant_and_nothing_else(
    database: Dsns, portals: Portals, db: Database
) -> None:
    acme, globex = await _tenants(database.owner)
    store = IdempotencyStore()
    for tenant, prefix in ((acme, "a"), (globex, "g")):
        async with db.transaction(tenant) as tx:
            for i in range(5):
                assert await store.claim(tx, tenant, IdempotencyClaim("Patient/1", f"{prefix}{i}", b"h")) is None
    await _expire(database.owner, ["a0", "a1", "a2", "g0", "g1"])
    purged = await IdempotencyPurger(db, store, interval=60, batch=2).purge()
    again = await IdempotencyPurger(db, store, interval=60, batch=2).purge()
    keys = await as_owner(database.owner, lambda conn: conn.fetch("SELECT key FROM idempotency_keys"))
    left = sorted(row["key"] for row in keys)
    assert (purged, again) == (5, 0)
    assert left == ["a3", "a4", "g2", "g3", "g4"]


async def test_without_the_foreign_keys_rows_still_cannot_name_another_tenant(database: Dsns, portals: Portals) -> None:
    """The audit outbox and the idempotency keys have no foreign key to `tenants` (migration 0008): their
    row-level security is what keeps a row to the transaction's own tenant."""
    acme, globex = await _tenants(database.owner)
    inserts = (
        "INSERT INTO idempotency_keys (tenant_id, principal, key, request_hash) VALUES ($1, 'Patient/1', 'k', '\\x00')",
        "INSERT INTO audit_outbox (event_id, occurred_at, tenant_id, action, outcome, entry) "
        "VALUES (gen_random_uuid(), now(), $1, 'x', 'success', '\\x00')",
    )
    conn = await asyncpg.connect(database.app)
    try:
        for tenant in (globex, uuid.uuid4()):
            for insert in inserts:
                async with conn.transaction():
                    await conn.execute("SELECT set_config('bedside.tenant_id', $1, true)", str(acme))
                    with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
                        await conn.execute(insert, tenant)
        with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
            await conn.execute("DELETE FROM tenants WHERE id = $1", acme)
    finally:
        await conn.close()
