"""The connection pool's release step: no round trip of its own, and still nothing of one request left
for the next (a transaction a cancelled request left open is rolled back)."""

from __future__ import annotations

import uuid

from asyncpg.connection import LoggedQuery

from service.store.attachments import AttachmentStore
from service.store.db import Database
from tests.conftest import Dsns


class LeakyDatabase(Database):
    """The application's Database, with a way to do what a request cancelled mid-transaction does: give
    the connection back to the pool inside an open transaction."""

    async def leave_open(self, tenant_id: uuid.UUID) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute(f"BEGIN; SELECT pg_catalog.set_config('bedside.tenant_id', '{tenant_id}', true)")
            await conn.execute("CREATE TEMP TABLE left_behind (x int) ON COMMIT DROP")


async def test_releasing_a_connection_sends_nothing(database: Dsns) -> None:
    db = await Database.connect(database.app, min_size=1, max_size=1)
    sent: list[str] = []

    def note(query: LoggedQuery) -> None:
        sent.append(query.query)

    try:
        async with db.transaction() as tx:
            tx.conn.add_query_logger(note)  # stays on the one connection after release
            await tx.conn.fetchval("SELECT 1")
        async with db.transaction() as tx:
            tx.conn.remove_query_logger(note)
    finally:
        await db.close()
    assert sent == ["SELECT 1", "COMMIT", "BEGIN"], sent


async def test_a_transaction_left_open_is_rolled_back_before_the_next_request(database: Dsns) -> None:
    db = await LeakyDatabase.connect(database.app, min_size=1, max_size=1)
    try:
        await db.leave_open(uuid.uuid4())
        async with db.transaction() as tx:
            tenant = await tx.conn.fetchval("SELECT current_setting('bedside.tenant_id', true)")
            leftover = await tx.conn.fetchval("SELECT to_regclass('pg_temp.left_behind')")
    finally:
        await db.close()
    assert tenant in (None, "")
    assert leftover is None


async def test_an_uploads_longer_idle_limit_ends_with_its_transaction(database: Dsns) -> None:
    """An upload lets its own transaction sit idle longer than the pool's limit; the connection's next
    transaction, a request of anyone's, has the pool's limit again."""
    db = await Database.connect(database.app, min_size=1, max_size=1, statement_timeout_ms=500)
    show = "SELECT current_setting('idle_in_transaction_session_timeout')"
    try:
        async with db.transaction() as tx:
            await AttachmentStore().idle_for(tx, 300.5)
            during = await tx.conn.fetchval(show)
        async with db.transaction() as tx:
            after = await tx.conn.fetchval(show)
    finally:
        await db.close()
    assert (during, after) == ("300500ms", "1s")
