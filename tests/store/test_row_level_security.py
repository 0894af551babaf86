"""Row-level security: the second wall. Even SQL that forgets its tenant filter sees one tenant."""

from __future__ import annotations

import asyncpg
import pytest

from tests.conftest import Portals


async def _tenant_id(conn: asyncpg.Connection, slug: str):
    return await conn.fetchval("SELECT id FROM tenants WHERE slug = $1", slug)


async def test_unfiltered_query_as_the_app_role_sees_only_its_tenants_rows(database, portals: Portals) -> None:
    conn = await asyncpg.connect(database.app)
    try:
        acme = await _tenant_id(conn, "acme")
        async with conn.transaction():
            await conn.execute("SELECT set_config('bedside.tenant_id', $1, true)", str(acme))
            issuers = await conn.fetch("SELECT tenant_id, issuer FROM issuers")  # no WHERE on purpose
            keys = await conn.fetch("SELECT tenant_id FROM issuer_keys")
        assert [r["issuer"] for r in issuers] == ["https://portal.acme.test"]
        assert {r["tenant_id"] for r in keys} == {acme}
    finally:
        await conn.close()


async def test_without_a_tenant_set_tenant_tables_look_empty(database, portals: Portals) -> None:
    conn = await asyncpg.connect(database.app)
    try:
        assert await conn.fetchval("SELECT count(*) FROM issuers") == 0
        assert await conn.fetchval("SELECT count(*) FROM issuer_keys") == 0
    finally:
        await conn.close()


async def test_the_tenant_setting_ends_with_its_transaction(database, portals: Portals) -> None:
    conn = await asyncpg.connect(database.app)
    try:
        acme = await _tenant_id(conn, "acme")
        async with conn.transaction():
            await conn.execute("SELECT set_config('bedside.tenant_id', $1, true)", str(acme))
            assert await conn.fetchval("SELECT count(*) FROM issuers") == 1
        assert await conn.fetchval("SELECT count(*) FROM issuers") == 0
    finally:
        await conn.close()


async def test_the_app_role_cannot_write_a_row_into_another_tenant(database, portals: Portals) -> None:
    conn = await asyncpg.connect(database.app)
    try:
        acme, globex = await _tenant_id(conn, "acme"), await _tenant_id(conn, "globex")
        async with conn.transaction():
            await conn.execute("SELECT set_config('bedside.tenant_id', $1, true)", str(acme))
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
                await conn.execute("INSERT INTO issuers (tenant_id, issuer) VALUES ($1, 'https://evil.test')", globex)
    finally:
        await conn.close()


async def test_the_owner_sees_every_tenant_which_is_why_the_service_never_runs_as_it(
    database, portals: Portals
) -> None:
    conn = await asyncpg.connect(database.owner)
    try:
        assert await conn.fetchval("SELECT count(*) FROM issuers") == 2
    finally:
        await conn.close()


async def test_the_app_role_cannot_change_or_drop_the_schema(database) -> None:
    conn = await asyncpg.connect(database.app)
    try:
        for statement in (
            "DROP TABLE issuers",
            "ALTER TABLE issuers DISABLE ROW LEVEL SECURITY",
            "CREATE TABLE sneaky (id int)",
            "DELETE FROM tenants",
            "UPDATE schema_migrations SET checksum = 'x'",
        ):
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
                await conn.execute(statement)
    finally:
        await conn.close()
