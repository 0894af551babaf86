"""Preparing a database as its owner: create it, migrate it, give the service its login role.

Used by embedded mode (which owns its whole cluster) and by the test suite; a production database is
prepared by `bedside migrate` and by the operator's own role management (README, "Database roles").
"""

from __future__ import annotations

import asyncpg

from service.store.migrate import Migration, MigrationRefusedError, ensure_login_role, migrate, schema_status

_DB_EXISTS = "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_database WHERE datname = $1)"
_CREATE_DB = "SELECT pg_catalog.format('CREATE DATABASE %I', $1::text)"


async def ensure_database(maintenance_dsn: str, name: str) -> bool:
    """Create database `name` if it does not exist (connected to the maintenance database)."""
    conn = await asyncpg.connect(maintenance_dsn)
    try:
        if await conn.fetchval(_DB_EXISTS, name):
            return False
        await conn.execute(await conn.fetchval(_CREATE_DB, name))
        return True
    finally:
        await conn.close()


async def migrate_database(owner_dsn: str) -> list[Migration]:
    conn = await asyncpg.connect(owner_dsn)
    try:
        return await migrate(conn)
    finally:
        await conn.close()


async def prepare_database(
    owner_dsn: str, login_role: str, password: str, *, login_if_refused: bool = False
) -> list[Migration]:
    """Migrate and (re)create the service's login role; returns the migrations applied. A migration that
    refuses (MigrationRefusedError) is raised all the same; with `login_if_refused` the login role is made
    first, so that a command can still connect to make the repair the refusal asks for."""
    conn = await asyncpg.connect(owner_dsn)
    try:
        try:
            applied = await migrate(conn)
        except MigrationRefusedError:
            if login_if_refused:
                await ensure_login_role(conn, login_role, password)
            raise
        await ensure_login_role(conn, login_role, password)
        return applied
    finally:
        await conn.close()


async def schema_report(dsn: str) -> tuple[int, int, str | None]:
    """(applied, known, problem) for `bedside migrate --status`."""
    conn = await asyncpg.connect(dsn)
    try:
        status = await schema_status(conn)
        return status.applied, status.known, status.problem
    finally:
        await conn.close()
