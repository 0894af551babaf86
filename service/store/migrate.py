"""Numbered SQL migrations, applied in order under an advisory lock, with checksums.

`migrations/NNNN_slug.sql`, numbered densely from 0001. Each runs in its own transaction together with
its row in `schema_migrations`. A migration whose file changed after it was applied, or a database that
has migrations this code does not know, is refused: Bedside never serves against a schema it does not
know.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

from service.errors import ConfigurationError
from service.store.db import Conn, Tx

# pg_advisory_lock key: any constant shared by every Bedside process ("bedside" in ASCII, as an int).
MIGRATION_LOCK = 0x62656473696465
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    checksum text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""
_APPLIED = "SELECT version, name, checksum FROM schema_migrations ORDER BY version"
_RECORD = "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)"
_TABLE_EXISTS = "SELECT pg_catalog.to_regclass('public.schema_migrations') IS NOT NULL"


class MigrationError(ConfigurationError):
    """The database's schema history and this code's migrations disagree."""


class MigrationRefusedError(MigrationError):
    """A migration checked the data first and refused to run (its own RAISE): the migrations before it are
    applied, the schema stands there, and its message says what the operator should do."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(package: str = "service.store.migrations") -> list[Migration]:
    """The migrations shipped with this code, in order; numbering must be dense from 1."""
    found = []
    for entry in resources.files(package).iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    for expected, migration in enumerate(found, start=1):
        if migration.version != expected:
            raise MigrationError(f"migration numbering has a gap or duplicate at {migration.version:04d}")
    return found


@dataclass(frozen=True, slots=True)
class SchemaStatus:
    applied: int
    known: int
    problem: str | None

    @property
    def current(self) -> bool:
        return self.problem is None and self.applied == self.known


def _compare(applied: list[asyncpg.Record], known: list[Migration]) -> str | None:
    by_version = {m.version: m for m in known}
    for row in applied:
        migration = by_version.get(row["version"])
        if migration is None:
            return (
                f"the database has migration {row['version']:04d}_{row['name']}, which this version of "
                "Bedside does not know (the schema is newer than the code)"
            )
        if row["checksum"] != migration.checksum:
            return (
                f"migration {migration.version:04d}_{migration.name} was changed after it was applied; "
                "restore the original file and add a new migration instead"
            )
    return None


async def schema_status(conn: Conn, known: list[Migration] | None = None) -> SchemaStatus:
    """Compare the database's schema history with this code's migrations, changing nothing."""
    known = load_migrations() if known is None else known
    if not await conn.fetchval(_TABLE_EXISTS):
        return SchemaStatus(applied=0, known=len(known), problem=None)
    applied = await conn.fetch(_APPLIED)
    return SchemaStatus(applied=len(applied), known=len(known), problem=_compare(applied, known))


async def migrate(conn: Conn, known: list[Migration] | None = None) -> list[Migration]:
    """Apply every pending migration; return those applied (none when the schema is current).

    Run as the owner role. Concurrent runners serialize on an advisory lock, so the second finds
    nothing to do.
    """
    known = load_migrations() if known is None else known
    await conn.execute("SELECT pg_catalog.pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute(_CREATE_TABLE)
        applied = await conn.fetch(_APPLIED)
        problem = _compare(applied, known)
        if problem:
            raise MigrationError(problem)
        done = {row["version"] for row in applied}
        ran = []
        for migration in known:
            if migration.version in done:
                continue
            try:
                async with conn.transaction():
                    await conn.execute(migration.sql)
                    await conn.execute(_RECORD, migration.version, migration.name, migration.checksum)
            except asyncpg.exceptions.RaiseError as refused:
                # A migration that checks the data first and refuses (RAISE EXCEPTION, in words of our own
                # that name no patient data): the operator reads why and what to do, not a traceback.
                raise MigrationRefusedError(_refusal(migration, refused)) from None
            ran.append(migration)
        return ran
    finally:
        await conn.execute("SELECT pg_catalog.pg_advisory_unlock($1)", MIGRATION_LOCK)


def _refusal(migration: Migration, refused: asyncpg.exceptions.RaiseError) -> str:
    """Why a migration refused to run, with its detail and hint, one per line."""
    lines = [f"migration {migration.version:04d}_{migration.name} refused to run: {refused.message}"]
    lines += [str(part) for part in (refused.detail, refused.hint) if part]
    return "\n".join(lines)


_ROLE_EXISTS = "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1)"
_CREATE_LOGIN = "SELECT pg_catalog.format('CREATE ROLE %I LOGIN PASSWORD %L IN ROLE bedside_app', $1::text, $2::text)"
_ALTER_LOGIN = "SELECT pg_catalog.format('ALTER ROLE %I LOGIN PASSWORD %L', $1::text, $2::text)"
_GRANT_CONNECT = "SELECT pg_catalog.format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), $1::text)"
_GRANT_APP = "SELECT pg_catalog.format('GRANT bedside_app TO %I', $1::text)"


async def ensure_login_role(conn: Conn, name: str, password: str) -> None:
    """Create (or re-password) a login role in bedside_app, as embedded mode and the tests need.

    Role DDL takes no parameters, so PostgreSQL's own format() quotes the name and password.
    """
    statement = _ALTER_LOGIN if await conn.fetchval(_ROLE_EXISTS, name) else _CREATE_LOGIN
    await conn.execute(await conn.fetchval(statement, name, password))
    await conn.execute(await conn.fetchval(_GRANT_APP, name))
    await conn.execute(await conn.fetchval(_GRANT_CONNECT, name))


class SchemaStore:
    """Schema status for the running service (readiness and the start-up check)."""

    def __init__(self, known: list[Migration] | None = None) -> None:
        self._known = load_migrations() if known is None else known

    async def status(self, tx: Tx) -> SchemaStatus:
        return await schema_status(tx.conn, self._known)
