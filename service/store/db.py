"""The connection pool, tenant-scoped transactions, and the start-up checks on the database role.

Every transaction that touches tenant-owned rows sets `bedside.tenant_id` for that transaction only;
the row-level security policies of the migrations read it, so a query that forgets its tenant filter
still sees one tenant's rows. With no tenant set, those tables look empty (fail closed).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar
from uuid import UUID

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from service.errors import ConfigurationError, UnavailableError

APP_ROLE = "bedside_app"

_SET_TENANT = "SELECT pg_catalog.set_config('bedside.tenant_id', $1, true)"

_ROLE_FACTS = """
SELECT r.rolsuper, r.rolbypassrls,
       pg_catalog.pg_has_role(current_user, $1, 'MEMBER') AS in_app_role,
       EXISTS (
           SELECT 1 FROM pg_catalog.pg_tables t
           WHERE t.schemaname = 'public' AND t.tablename = 'tenants'
             AND pg_catalog.pg_has_role(current_user, t.tableowner, 'MEMBER')
       ) AS owns_tables
FROM pg_catalog.pg_roles r
WHERE r.rolname = current_user
"""


async def _keep_session(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """The pool's release step, in place of asyncpg's default `RESET ALL` batch.

    Pooled connections carry no session state: the tenant is set for one transaction (`set_config(...,
    true)`), advisory locks are transaction-scoped, cursors live inside transactions, nothing LISTENs,
    and the sequencer's session lock lives on a connection of its own (`Database.session`). So the
    default reset (`pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`) would be a round trip per
    request that finds nothing to undo. The driver still rolls back a transaction left open (a cancelled
    request) before it calls this, and that is what keeps one request's work out of the next one's."""


# The connections the caller's role may open, all its clients together: the least of the server's slots
# (max_connections less those kept for superusers and, from PostgreSQL 16, for roles granted
# pg_use_reserved_connections), the login role's CONNECTION LIMIT (session_user's: PostgreSQL counts the
# role that logged in, whatever role it then acts as) and the database's (-1: none).
_CONNECTION_LIMITS = """
SELECT pg_catalog.current_setting('max_connections')::int
       - pg_catalog.current_setting('superuser_reserved_connections')::int
       - coalesce(pg_catalog.current_setting('reserved_connections', true)::int, 0) AS server,
       (SELECT r.rolconnlimit FROM pg_catalog.pg_roles r WHERE r.rolname = session_user) AS role,
       (SELECT d.datconnlimit FROM pg_catalog.pg_database d WHERE d.datname = pg_catalog.current_database()) AS database
"""


# Whether this transaction may not write. On a hot standby every transaction is read-only (an old primary a
# failover restarted as one is a standby too); so is every transaction of a session whose
# default_transaction_read_only is on (how a failover manager fences an old primary it cannot stop: in the
# server's configuration, or the database's or the role's setting, which the next sessions take).
_READ_ONLY = "SELECT pg_catalog.current_setting('transaction_read_only')::boolean"


# What is an outage (`UnavailableError`: 503 with Retry-After at the HTTP edge, a webhook delivery left to
# the reaper): the server cannot serve this connection now, and a later one may succeed. Exactly these:
# - `_UNAVAILABLE`, wherever it is raised. Only the driver raises these: the server is unreachable, the
#   connection died mid-way, the server ended the session or turned it away (a restart, a failover, a
#   full server), or it takes no writes (an old primary a failover demoted, a hot standby a stale DNS name
#   still points at).
# - `_UNREACHABLE` (an OSError too, or no host of the URL taking writes) while a connection is opened, or
#   from a statement of our own (BEGIN, COMMIT, ROLLBACK, the pool's release): nothing of the caller's runs
#   there, so it is the connection's. While a connection is opened or given back (`_CONNECTING`), an
#   InterfaceError too: there it is the driver's word on the connection or the pool (an authentication it
#   cannot do, the pool closing at shutdown), not on a statement.
# - An OSError raised in the transaction's body, only when the connection closed with it. The caller's
#   code raises OSErrors of its own (a key file it reads, a timeout of its own: TimeoutError is one); those
#   are not the database's and propagate as they are, the transaction rolled back.
# - An InternalClientError, only when the connection closed with it: the one the driver has no name for.
#   When the server ends an idle pooled connection, its FATAL error can reach asyncpg before the
#   connection's end does, and the next statement fails with InternalClientError ("cannot switch to state
#   ...") after which asyncpg closes the connection. One that leaves it open is not the server going away.
# - An InterfaceError of a statement, only when the connection is closed. asyncpg has no type of its own for
#   "the connection is closed": a statement on one the driver has closed fails with a plain InterfaceError
#   ("connection is closed", or the pool's "released back to the pool" once the driver gave back one it saw
#   end), and on a live connection the same class is a statement we got wrong (more or fewer arguments than
#   it has parameters, a type with no codec for the format, two statements at once on one connection). That
#   is a bug of ours, not the server going away: it propagates as itself (a logged 500; before a webhook
#   delivery's request goes out, a failed attempt), and the connection, alive, goes back to the pool. So the
#   connection is asked (`_closed`); the message is not read. (A value that does not fit its parameter is
#   asyncpg's DataError, which is the PostgresError of class 22, not the InterfaceError subclass of that name
#   in asyncpg.exceptions._base; a connection lost mid-statement is ConnectionDoesNotExistError, class 08.)
# Not 57014 query_canceled (statement_timeout): that statement would time out again, and a webhook delivery
# that keeps doing so must be dead-lettered, not retried forever.
#
# What follows from an outage: a pooled connection it leaves open is terminated, never handed out again (a
# read-only server's would refuse every write it is given; a new one may reach the new primary). When it
# is the first statement of a pooled connection's use (BEGIN, a health check's read) that fails, and the
# failure says that connection is dead (`_ENDED`), the statement goes once more on a new connection; only
# a second failure is `UnavailableError`. No later statement goes twice, and never COMMIT.
_UNAVAILABLE = (
    asyncpg.exceptions.PostgresConnectionError,  # class 08; also a statement whose session was ended
    asyncpg.exceptions.AdminShutdownError,  # 57P01: fast shutdown, pg_terminate_backend, a failover manager
    asyncpg.exceptions.CrashShutdownError,  # 57P02: another backend crashed, the server restarts
    asyncpg.exceptions.CannotConnectNowError,  # 57P03: starting up, shutting down, in recovery
    asyncpg.exceptions.IdleSessionTimeoutError,  # 57P05: the server's idle_session_timeout ended it
    asyncpg.exceptions.TooManyConnectionsError,  # 53300: no connection slot free, for now
    asyncpg.exceptions.ReadOnlySQLTransactionError,  # 25006: a read-only server, until the failover is done
)
_UNREACHABLE = (
    OSError,
    asyncpg.exceptions.TargetServerAttributeNotMatched,  # no host takes writes (target_session_attrs=read-write)
    *_UNAVAILABLE,
)
# Opening a connection or giving one back: no statement of anyone's.
_CONNECTING = (asyncpg.exceptions.InterfaceError, *_UNREACHABLE)
# From a statement, an outage only when the connection closed with it.
_IF_CLOSED = (OSError, asyncpg.exceptions.InternalClientError, asyncpg.exceptions.InterfaceError)

# A pooled connection's first statement of a use (BEGIN, or a health check's read) failing with one of these
# says the connection is dead, not the server: its session was ended while it sat in the pool (a restart,
# a failover, idle_session_timeout) or its socket broke; so does an InternalClientError or InterfaceError
# after which the connection is closed. Nothing of the caller's has run on it, so that statement goes once
# more on the connection the pool acquires next.
_ENDED = (
    OSError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.IdleSessionTimeoutError,
)


T = TypeVar("T")

# Subscripted only for the type checker: asyncpg's classes are not generic at run time.
Conn: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"
Pooled: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"


def _closed(conn: Conn) -> bool:
    """Whether the driver has closed `conn`. A pooled connection whose end the driver saw mid-use it has
    already given back to the pool, and the caller's proxy then answers only that it was released."""
    try:
        return conn.is_closed()
    except asyncpg.exceptions.InterfaceError:
        return True


def _drop(conn: Pooled) -> None:
    """Keep `conn`, which an outage befell, out of the pool: the pool opens a new connection in its place."""
    if not _closed(conn):
        conn.terminate()


def _ended(exc: BaseException, conn: Conn) -> bool:
    """Whether `exc`, raised by the first statement of a pooled connection's use, says it is dead."""
    if isinstance(exc, _ENDED):
        return True
    return isinstance(exc, _IF_CLOSED) and _closed(conn)


def _unavailable(exc: BaseException, conn: Conn, *, ours: bool = False) -> bool:
    """Whether `exc`, raised while `conn` was in use, is an outage (the rules above `_UNAVAILABLE`).
    `ours`: raised by a statement of our own, not by the caller's code."""
    if isinstance(exc, _UNREACHABLE if ours else _UNAVAILABLE):
        return True
    return isinstance(exc, _IF_CLOSED) and _closed(conn)


def is_outage(exc: BaseException, conn: Conn) -> bool:
    """Whether `exc`, raised by a statement on `conn`, is the database's outage (the rules above). A store
    that maps a statement's failures to errors of its own lets these through, so that the transaction
    answers with `UnavailableError` and drops a connection the outage leaves open (a read-only server's)."""
    return _unavailable(exc, conn)


@dataclass(frozen=True, slots=True)
class Tx:
    """An open transaction. The domain passes it from store call to store call and never looks inside."""

    conn: Conn
    tenant_id: UUID | None


class Database:
    """The application's pool. Built by create_app, closed by its cleanup context."""

    def __init__(self, pool: asyncpg.Pool, dsn: str, server_settings: dict[str, str]) -> None:
        self._pool = pool
        self._dsn = dsn
        self._server_settings = server_settings

    @classmethod
    async def connect(
        cls, dsn: str, *, min_size: int = 2, max_size: int = 20, statement_timeout_ms: int = 15_000
    ) -> Database:
        server_settings = {
            "application_name": "bedside",
            "statement_timeout": str(statement_timeout_ms),
            "idle_in_transaction_session_timeout": str(statement_timeout_ms * 2),
        }
        try:
            pool = await asyncpg.create_pool(
                dsn, min_size=min_size, max_size=max_size, server_settings=server_settings, reset=_keep_session
            )
        except _CONNECTING as exc:
            raise ConfigurationError(f"cannot connect to the database ({type(exc).__name__})") from None
        except asyncpg.exceptions.InvalidAuthorizationSpecificationError:
            raise ConfigurationError("the database refused the login (check the role and password)") from None
        except asyncpg.exceptions.InvalidCatalogNameError:
            raise ConfigurationError("the database named in the URL does not exist") from None
        return cls(pool, dsn, server_settings)

    async def close(self) -> None:
        await self._pool.close()

    @contextlib.asynccontextmanager
    async def transaction(self, tenant_id: UUID | None = None) -> AsyncIterator[Tx]:
        """One transaction, scoped to `tenant_id` when given. Commits on normal exit, rolls back on error.

        BEGIN and the tenant setting travel in one round trip (a simple-protocol batch). The tenant id is a
        `UUID`, whose text form is 36 hex digits and dashes: nothing in it needs escaping. A request
        cancelled mid-way leaves the transaction to the pool, whose reset rolls it back.
        A database that cannot be reached becomes `UnavailableError`: callers fail closed. An exception of
        the body's own, an OSError too, rolls the transaction back and propagates as it is. A pooled
        connection the server ended while it sat idle is replaced at BEGIN (`_connection`); no statement
        after BEGIN is ever sent twice.
        """
        begin = "BEGIN"
        if tenant_id is not None:
            if not isinstance(tenant_id, UUID):
                raise TypeError("tenant_id must be a UUID")
            begin = f"BEGIN; SELECT pg_catalog.set_config('bedside.tenant_id', '{tenant_id}', true)"
        async with self._connection(lambda conn: conn.execute(begin)) as (conn, _):
            try:
                yield Tx(conn=conn, tenant_id=tenant_id)
            except BaseException as exc:
                # The body's exception is the answer, whatever becomes of the ROLLBACK.
                with contextlib.suppress(*_CONNECTING, asyncpg.PostgresError, asyncpg.exceptions.InternalClientError):
                    await conn.execute("ROLLBACK")
                if _unavailable(exc, conn):
                    _drop(conn)
                    raise UnavailableError("the database is not reachable") from None
                raise
            try:
                await conn.execute("COMMIT")  # never sent again: on another connection it would commit nothing
            except BaseException as exc:
                if _unavailable(exc, conn, ours=True):
                    _drop(conn)
                    raise UnavailableError("the database is not reachable") from None
                raise

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[Conn]:
        """A connection of its own, outside the pool, for session state that must outlive one
        transaction (the sequencer's advisory lock). Closing it releases that state."""
        try:
            conn = await asyncpg.connect(self._dsn, server_settings=self._server_settings)
        except _CONNECTING:
            raise UnavailableError("the database is not reachable") from None
        try:
            yield conn
        finally:
            await conn.close()

    async def scoped(self, tx: Tx, tenant_id: UUID) -> Tx:
        """The same transaction, from now on scoped to `tenant_id` (a tenant it has just created)."""
        await tx.conn.execute(_SET_TENANT, str(tenant_id))
        return Tx(conn=tx.conn, tenant_id=tenant_id)

    async def replace_connections(self) -> None:
        """Have every connection of the pool replaced by a new one at its next use (one in use, once it is
        given back). For those opened while the server took no writes: they would refuse writes for good,
        as a session keeps the default it started with, and a new one may find the server taking them."""
        await self._pool.expire_connections()

    async def fetch_value(self, query: str, *args: Any) -> Any:
        """A single value outside any tenant (health checks). `query` only reads: on a pooled connection
        the server has ended, it goes again on a fresh one."""
        async with self._connection(lambda conn: conn.fetchval(query, *args)) as (_, value):
            return value

    @contextlib.asynccontextmanager
    async def _connection(self, first: Callable[[Pooled], Awaitable[T]]) -> AsyncIterator[tuple[Pooled, T]]:
        """A pooled connection, released on exit, with what `first`, its first statement of this use, returned.

        A pooled connection the server ended while it sat idle (a restart, a failover) fails its next
        statement, and nothing of the caller's has run on it yet: `first` goes once more, on the connection
        the pool acquires next, and the dead one is never handed out again (the pool replaces a closed
        connection; one the driver has not closed yet is terminated). A second failure is the answer.
        """
        conn, result = await self._first(first)
        try:
            yield conn, result
        finally:
            await self._release(conn)

    async def _first(self, first: Callable[[Pooled], Awaitable[T]]) -> tuple[Pooled, T]:
        retried = False
        while True:
            conn = await self._acquire()
            try:
                return conn, await first(conn)
            except BaseException as exc:
                dead = _ended(exc, conn)
                unavailable = dead or _unavailable(exc, conn, ours=True)
                if unavailable:
                    _drop(conn)
                await self._release(conn)
                if dead and not retried:
                    retried = True
                    # A restart or a failover ends every session at once, so the pool's other idle
                    # connections are most likely dead too: each is replaced at its next use, and the
                    # statement goes again on a new connection.
                    await self._pool.expire_connections()
                    continue
                if unavailable:
                    raise UnavailableError("the database is not reachable") from None
                raise

    async def _acquire(self) -> Pooled:
        try:
            return await self._pool.acquire()
        except _CONNECTING:
            raise UnavailableError("the database is not reachable") from None

    async def _release(self, conn: Pooled) -> None:
        try:
            await self._pool.release(conn)
        except _CONNECTING:
            raise UnavailableError("the database is not reachable") from None


async def client_connections(db: Database) -> int:
    """How many client connections to the server there are besides the caller's."""
    count: int = await db.fetch_value(
        "SELECT count(*) FROM pg_catalog.pg_stat_activity "
        "WHERE backend_type = 'client backend' AND pid <> pg_catalog.pg_backend_pid()"
    )
    return count


async def takes_writes(tx: Tx) -> bool:
    """Whether the server takes writes in `tx`, begun as all of the service's are (a plain BEGIN). When it
    does not, a write in it would be refused (25006 read_only_sql_transaction) while reads succeed."""
    read_only: bool = await tx.conn.fetchval(_READ_ONLY)
    return not read_only


@dataclass(frozen=True, slots=True)
class ConnectionLimit:
    """How many connections the server accepts from the caller's role, and which limit says so."""

    slots: int
    source: str  # in an operator's words: "max_connections less its reserved slots", ...
    remedy: str  # what would raise it


async def connection_limit(db: Database) -> ConnectionLimit:
    """The tightest of the server's, the role's and the database's connection limits."""
    async with db.transaction() as tx:
        row = await tx.conn.fetchrow(_CONNECTION_LIMITS)
    assert row is not None
    found = [ConnectionLimit(row["server"], "max_connections less its reserved slots", "the server's max_connections")]
    for column, which in (("role", "the login role's"), ("database", "the database's")):
        if row[column] is not None and row[column] >= 0:
            found.append(ConnectionLimit(row[column], f"{which} CONNECTION LIMIT", f"{which} CONNECTION LIMIT"))
    return min(found, key=lambda limit: limit.slots)


async def check_application_role(db: Database) -> None:
    """Refuse to serve as a role that row-level security does not bind.

    The service must connect as a login role that is a member of `bedside_app` and is neither a
    superuser, nor BYPASSRLS, nor (a member of) the tables' owner: for those, RLS is not enforced.
    """
    async with db.transaction() as tx:
        facts = await tx.conn.fetchrow(_ROLE_FACTS, APP_ROLE)
    if facts is None:
        raise ConfigurationError("cannot read the database role's attributes")
    if facts["rolsuper"] or facts["rolbypassrls"] or facts["owns_tables"]:
        raise ConfigurationError(
            "refusing to serve as a database role that bypasses row-level security (superuser, "
            "BYPASSRLS or the tables' owner). Connect as a login role granted bedside_app; see README "
            "'Database roles'."
        )
    if not facts["in_app_role"]:
        raise ConfigurationError("the database role is not a member of bedside_app; see README 'Database roles'")
