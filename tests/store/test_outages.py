"""What `Database` calls an outage (`UnavailableError`: 503 with Retry-After at the HTTP edge, a webhook
delivery left to the reaper) and what it does not.

An outage is the server saying it cannot serve this connection now while a later one may succeed: it is
unreachable, it ended the session (a restart, a failover, pg_terminate_backend), it is starting up, shutting
down or in recovery, it has no connection slot free, or it takes no writes (a demoted primary, a standby). A
statement that runs past its timeout is not: it would time out again, and a webhook delivery that keeps doing
it must be dead-lettered, not retried forever. Nor is an OSError of the caller's own code, nor a statement
the driver refuses on a live connection (a bug of ours). A pooled
connection the server ended while it sat idle is an outage for no one: BEGIN goes again on a fresh one."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest

from service.errors import ConfigurationError, UnavailableError
from service.store.db import Database, Tx
from service.store.tenants import TenantStore
from tests.conftest import Dsns
from tests.support import DatabaseLink, database_connection_limit, database_read_only


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


@pytest.fixture
async def link(database: Dsns) -> AsyncIterator[DatabaseLink]:
    """A link the test can cut between the pool and the test's database."""
    link = DatabaseLink(database.app)
    await link.start()
    yield link
    await link.close()


async def _backends(db: Database, count: int) -> list[int]:
    """The backends of `count` pooled connections, all held at once so that each is a connection of its own."""
    async with contextlib.AsyncExitStack() as held:
        return [
            await (await held.enter_async_context(db.transaction())).conn.fetchval("SELECT pg_backend_pid()")
            for _ in range(count)
        ]


async def test_pooled_connections_the_server_ended_while_they_sat_idle_fail_no_transaction(
    database: Dsns, link: DatabaseLink
) -> None:
    """A restart or a failover ends every session, idle pooled ones too. When the server's FATAL error has
    reached an idle connection but its closing has not yet, the driver learns of it only on the next
    statement (asyncpg's InternalClientError, 'cannot switch to state ...'). That statement is BEGIN,
    which nothing has run before: it goes again, once, on a fresh connection, so no transaction fails
    for any of the dead connections the pool held."""
    db = await Database.connect(link.dsn, min_size=4, max_size=4)
    try:
        ended = await _backends(db, 4)
        for backend in ended:
            await link.end_idle(database.owner, backend)

        for _ in range(4):
            async with db.transaction() as tx:
                assert await tx.conn.fetchval("SELECT pg_backend_pid()") not in ended
    finally:
        await db.close()


async def test_a_pooled_connection_whose_end_arrives_as_its_begin_goes_out_is_replaced(link: DatabaseLink) -> None:
    """The server's side of an idle pooled connection closes (a restart) and the driver has not seen it yet
    when the pool hands the connection out: BEGIN goes out, then the connection's end arrives (asyncpg's
    ConnectionDoesNotExistError, the connection already given back to the pool). BEGIN goes again on a
    fresh connection."""
    db = await Database.connect(link.dsn, min_size=1, max_size=1)
    try:
        backend = await db.fetch_value("SELECT pg_backend_pid()")
        link.cut()  # nothing awaited after it: the driver learns of the end only once BEGIN is on its way

        async with db.transaction() as tx:
            assert await tx.conn.fetchval("SELECT pg_backend_pid()") != backend
    finally:
        await db.close()


async def test_a_health_check_on_a_pooled_connection_the_server_ended_is_answered_on_a_fresh_one(
    database: Dsns, link: DatabaseLink
) -> None:
    """`fetch_value` runs one statement that only reads, outside any transaction: going again is safe."""
    db = await Database.connect(link.dsn, min_size=1, max_size=1)
    try:
        backend = await db.fetch_value("SELECT pg_backend_pid()")
        await link.end_idle(database.owner, backend)

        assert await db.fetch_value("SELECT pg_backend_pid()") not in (None, backend)
    finally:
        await db.close()


async def test_a_begin_that_fails_again_on_the_fresh_connection_is_unavailable_at_once(
    database: Dsns, link: DatabaseLink
) -> None:
    """The pooled connection was ended and the server takes no new one (here 53300, the database's
    connection limit): BEGIN goes again once, on the connection the pool tries to open, and that failure
    is the answer, with no waiting and no third try."""
    db = await Database.connect(link.dsn, min_size=1, max_size=1)
    try:
        backend = await db.fetch_value("SELECT pg_backend_pid()")
        await link.end_idle(database.owner, backend)
        async with database_connection_limit(database.owner, database.name, 0):
            started = time.monotonic()
            with pytest.raises(UnavailableError) as raised:
                async with db.transaction():
                    pass
            assert time.monotonic() - started < 2
        # The second try's failure, not the first's: the dead connection was replaced.
        assert isinstance(raised.value.__context__, asyncpg.exceptions.TooManyConnectionsError)
        async with db.transaction() as tx:
            assert await tx.conn.fetchval("SELECT pg_backend_pid()") != backend
    finally:
        await db.close()


async def test_a_statement_of_the_transaction_is_not_repeated_when_its_connection_was_ended(
    database: Dsns, link: DatabaseLink
) -> None:
    """Only BEGIN goes again. A statement of the transaction's own whose session the server ended is an
    outage, and the transaction is over: the body does not run a second time."""
    db = await Database.connect(link.dsn, min_size=1, max_size=1)
    runs = []

    async def work() -> None:
        async with db.transaction() as tx:
            runs.append(await tx.conn.fetchval("SELECT pg_backend_pid()"))
            await link.end_idle(database.owner, runs[-1])
            await tx.conn.execute("SELECT 1")

    try:
        with pytest.raises(UnavailableError):
            await work()
        assert len(runs) == 1
    finally:
        await db.close()


async def test_a_commit_whose_connection_was_ended_is_unavailable_and_not_repeated(
    database: Dsns, link: DatabaseLink
) -> None:
    """COMMIT never goes again: on a fresh connection it would commit nothing and report success. The
    transaction's work is lost with its session, and the caller is told the database was unavailable."""
    db = await Database.connect(link.dsn, min_size=1, max_size=1)

    async def work() -> None:
        async with db.transaction() as tx:
            assert await TenantStore().create(tx, "lost-with-its-session") is not None
            await link.end_idle(database.owner, await tx.conn.fetchval("SELECT pg_backend_pid()"))

    try:
        with pytest.raises(UnavailableError):
            await work()
        async with db.transaction() as tx:
            assert await TenantStore().by_slug(tx, "lost-with-its-session") is None
    finally:
        await db.close()


@pytest.mark.parametrize(
    "error",
    [
        FileNotFoundError(2, "No such file or directory", "kek.json"),
        PermissionError(13, "Permission denied", "kek.json"),
        TimeoutError(),  # asyncio.timeout around a call of the caller's: an OSError too
    ],
    ids=type,
)
async def test_an_os_error_of_the_callers_own_in_a_transaction_is_not_an_outage(database: Dsns, error: OSError) -> None:
    """An OSError raised by the caller's code inside the transaction (reading a key file, a timeout of its
    own) says nothing about the database: it propagates as itself, the transaction is rolled back, and the
    connection, alive, serves the next transaction."""
    db = await Database.connect(database.app, min_size=1, max_size=1)

    async def fail(tx: Tx) -> None:
        raise error

    try:
        with pytest.raises(type(error)) as raised:
            await _rolled_back_on_a_live_connection(db, fail)
        assert raised.value is error
    finally:
        await db.close()


async def _rolled_back_on_a_live_connection(db: Database, fail: Callable[[Tx], Awaitable[object]]) -> None:
    """Write in a transaction on `db` (one connection), then `fail` in it; whatever it raises propagates.
    Then, as the caller's own check: the write was rolled back and the same backend serves the next one."""
    backends = []
    try:
        async with db.transaction() as tx:
            assert await TenantStore().create(tx, "rolled-back") is not None
            backends.append(await tx.conn.fetchval("SELECT pg_backend_pid()"))
            await fail(tx)
    finally:
        async with db.transaction() as tx:
            assert await TenantStore().by_slug(tx, "rolled-back") is None
            assert await tx.conn.fetchval("SELECT pg_backend_pid()") == backends[0]


# A statement our code gets wrong, on a live connection; asyncpg refuses it before it is sent. Too few
# arguments is an InterfaceError, the class asyncpg also raises for a connection it has closed. A value that
# does not fit its parameter is asyncpg.exceptions.DataError: the PostgresError of class 22, not the
# InterfaceError subclass of that name in asyncpg.exceptions._base (which asyncpg 0.32 does not raise).
MISUSES = {
    "wrong-argument-type": (("SELECT $1::int", "not a number"), asyncpg.exceptions.DataError),
    "wrong-argument-count": (("SELECT $1::int",), asyncpg.exceptions.InterfaceError),
}


@pytest.mark.parametrize("misuse", MISUSES)
async def test_a_statement_the_driver_refuses_on_a_live_connection_is_not_an_outage(
    database: Dsns, misuse: str
) -> None:
    """The driver's InterfaceError for our own mistake (a bug: a 500, its type logged) says nothing about the
    database: it propagates as itself, the transaction is rolled back, and the connection, alive, serves the
    next one. A health check's statement is not sent again on another connection either."""
    statement, error = MISUSES[misuse]
    db = await Database.connect(database.app, min_size=1, max_size=1)

    async def misuse_it(tx: Tx) -> None:
        await tx.conn.fetchval(*statement)

    try:
        with pytest.raises(error):
            await _rolled_back_on_a_live_connection(db, misuse_it)
        backend = await db.fetch_value("SELECT pg_backend_pid()")
        with pytest.raises(error):
            await db.fetch_value(*statement)
        assert await db.fetch_value("SELECT pg_backend_pid()") == backend  # not dropped, not sent again
    finally:
        await db.close()


async def test_a_write_on_a_read_only_server_is_unavailable_until_it_takes_writes_again(database: Dsns) -> None:
    """A server that refuses writes (25006 read_only_sql_transaction): an old primary demoted by a failover,
    or a hot standby that a stale DNS name still points at. For the caller it is temporary, an outage; and
    the connection is not given back to the pool, so once the server takes writes again (or the name points
    at the new primary) the next connection does."""
    async with database_read_only(database.owner, database.name):
        db = await Database.connect(database.app, min_size=1, max_size=1)

    async def write() -> None:
        async with db.transaction() as tx:
            await TenantStore().create(tx, "written")

    try:
        with pytest.raises(UnavailableError) as raised:
            await write()
        assert isinstance(raised.value.__context__, asyncpg.exceptions.ReadOnlySQLTransactionError)

        await write()
        async with db.transaction() as tx:
            assert await TenantStore().by_slug(tx, "written") is not None
    finally:
        await db.close()


async def test_a_url_that_asks_for_a_read_write_server_finds_none_is_unavailable(database: Dsns) -> None:
    """With `target_session_attrs=read-write` (the README's advice for a URL of several hosts), a connection
    to a server that refuses writes is given up at once; when no host takes writes (a failover not yet
    done) the driver says so with an error of its own: unavailable, or at start-up, cannot connect."""
    read_write = f"{database.app}{'&' if '?' in database.app else '?'}target_session_attrs=read-write"
    async with database_read_only(database.owner, database.name):
        with pytest.raises(ConfigurationError, match=r"^cannot connect to the database \("):
            await Database.connect(read_write, min_size=1, max_size=1)
        db = await Database.connect(read_write, min_size=0, max_size=1)
        try:
            with pytest.raises(UnavailableError):
                async with db.transaction():
                    pass
            with pytest.raises(UnavailableError):
                async with db.session():
                    pass
        finally:
            await db.close()


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
