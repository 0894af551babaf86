"""What `Database` calls an outage (`UnavailableError`: 503 with Retry-After at the HTTP edge, a webhook
delivery left to the reaper) and what it does not.

An outage is the server saying it cannot serve this connection now while a later one may succeed: it is
unreachable, it ended the session (a restart, a failover, pg_terminate_backend), it is starting up, shutting
down or in recovery, or it has no connection slot free. A statement that runs past its timeout is not: it
would time out again, and a webhook delivery that keeps doing it must be dead-lettered, not retried forever."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator

import asyncpg
import pytest

from service.errors import ConfigurationError, UnavailableError
from service.store.db import Database
from tests.conftest import Dsns
from tests.support import DatabaseLink, database_connection_limit


@pytest.fixture
async def refusing_server(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """The URL of a server that answers every connection's startup message with one FATAL error of
    SQLSTATE `request.param`, as PostgreSQL does while it starts up, shuts down or is full."""
    fields = b"".join(
        tag + value.encode() + b"\0" for tag, value in ((b"S", "FATAL"), (b"V", "FATAL"), (b"C", request.param))
    )
    fields += b"M" + b"refused by the test\0" + b"\0"
    error = b"E" + struct.pack("!I", len(fields) + 4) + fields

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        (length,) = struct.unpack("!I", await reader.readexactly(4))
        await reader.readexactly(length - 4)
        writer.write(error)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"postgresql://bedside:secret@127.0.0.1:{port}/bedside?sslmode=disable"
    server.close()
    await server.wait_closed()


@pytest.mark.parametrize(
    "refusing_server",
    [
        "57P01",  # admin_shutdown: a fast shutdown or a failover ends the session
        "57P02",  # crash_shutdown: another backend crashed and the server restarts
        "57P03",  # cannot_connect_now: starting up, shutting down, in recovery
        "57P05",  # idle_session_timeout: the server ended an idle session (sent at once here: the mapping is tested)
        "53300",  # too_many_connections: no slot free (max_connections, a role's or a database's limit)
    ],
    indirect=True,
)
async def test_a_server_that_refuses_connections_while_it_restarts_or_is_full_is_unavailable(
    refusing_server: str,
) -> None:
    with pytest.raises(ConfigurationError, match=r"^cannot connect to the database \("):
        await Database.connect(refusing_server, min_size=1, max_size=1)

    db = await Database.connect(refusing_server, min_size=0, max_size=1)  # opens its first connection on use
    try:
        with pytest.raises(UnavailableError):
            async with db.transaction():
                pass
        with pytest.raises(UnavailableError):
            await db.fetch_value("SELECT 1")
        with pytest.raises(UnavailableError):
            async with db.session():
                pass
    finally:
        await db.close()


async def test_a_database_that_takes_no_more_connections_is_unavailable_until_it_does(database: Dsns) -> None:
    """PostgreSQL itself turning the connection away (53300, here from the database's connection limit)."""
    db = await Database.connect(database.app, min_size=0, max_size=1)
    try:
        async with database_connection_limit(database.owner, database.name, 0):
            with pytest.raises(UnavailableError):
                async with db.transaction():
                    pass
        async with db.transaction() as tx:
            assert await tx.conn.fetchval("SELECT 1") == 1
    finally:
        await db.close()


async def test_a_pooled_connection_the_server_ended_while_it_sat_idle_is_unavailable_then_replaced(
    database: Dsns,
) -> None:
    """A failover ends every session, idle ones too. When the server's FATAL error has reached an idle
    pooled connection but its closing has not yet, the driver has no name for what it sees on the next
    statement (asyncpg's InternalClientError, 'cannot switch to state ...') and closes the connection
    itself: that too is an outage, and the pool's next connection is a fresh one."""
    link = DatabaseLink(database.app)
    await link.start()
    db = await Database.connect(link.dsn, min_size=1, max_size=1)
    try:
        backend = await db.fetch_value("SELECT pg_backend_pid()")
        await link.end_idle(database.owner, backend)

        with pytest.raises(UnavailableError) as raised:
            async with db.transaction():
                pass
        # The case named above, not the plainer one where the connection's end had arrived too.
        assert isinstance(raised.value.__context__, asyncpg.exceptions.InternalClientError)
        async with db.transaction() as tx:
            assert await tx.conn.fetchval("SELECT pg_backend_pid()") != backend
    finally:
        await db.close()
        await link.close()


async def test_a_statement_that_runs_past_its_timeout_is_not_an_outage(database: Dsns) -> None:
    """57014 query_canceled is the driver's QueryCanceledError, left as it is: the same statement would
    time out again, so retrying it as an outage would never end."""
    db = await Database.connect(database.app, min_size=1, max_size=1, statement_timeout_ms=50)
    try:
        with pytest.raises(asyncpg.exceptions.QueryCanceledError):
            async with db.transaction() as tx:
                await tx.conn.execute("SELECT pg_sleep(5)")
        async with db.transaction() as tx:
            assert await tx.conn.fetchval("SELECT 1") == 1
    finally:
        await db.close()
