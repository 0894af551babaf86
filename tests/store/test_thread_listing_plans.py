"""A page of `GET /v1/threads` costs a page of rows, however many threads the tenant has.

The listing statement (`MessagingStore.list_threads`) runs through EXPLAIN (ANALYZE) on a tenant of tens
of thousands of threads, as the service runs it (the application role, row-level security on), both as
the custom plan PostgreSQL makes for a statement's first executions and as the generic plan a cached
statement may settle on. No scan in either may read more than ten pages' worth of rows (rows returned
plus rows removed by a filter, over all its loops), nor all of them together more than twenty. The
participants' walks rely on each entry's copy of its thread's creation time, checked here too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, cast
from uuid import UUID

import asyncpg

from service.store.db import Database, Tx
from service.store.migrate import load_migrations, migrate
from tests.conftest import Dsns
from tests.store.listing_helpers import PAGE, PROBES, Cursor, Probe, cursor_of, expected, list_page, load

THREADS = 40_000
MOST_READ = 10 * PAGE  # by one scan, all its loops together
MOST_READ_IN_ALL = 20 * PAGE  # by all of them together


class _Capture:
    """Stands in for the connection and keeps what the store sends, so EXPLAIN runs exactly that."""

    def __init__(self) -> None:
        self.query = ""
        self.args: tuple[Any, ...] = ()

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        self.query, self.args = query, args
        return []


async def _statement(tenant: UUID, probe: Probe, cursor: Cursor) -> _Capture:
    """The SQL and arguments the store sends for the probe's page."""
    capture = _Capture()
    await list_page(Tx(conn=cast(Any, capture), tenant_id=tenant), probe, cursor)
    return capture


async def _explain(tx: Tx, statement: _Capture, *, generic: bool) -> dict[str, Any]:
    """The root plan node of EXPLAIN (ANALYZE) of the statement: custom (planned for these values), or
    generic (planned for any; EXECUTE takes no bind parameters, so the values go in as literals)."""
    conn = tx.conn
    if not generic:
        found = await conn.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + statement.query, *statement.args)
    else:
        types = (await conn.prepare(statement.query)).get_parameters()
        literals = [
            await conn.fetchval(f"SELECT pg_catalog.quote_nullable($1::{t.schema}.{t.name}::text)", value)
            for t, value in zip(types, statement.args, strict=True)
        ]
        await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        await conn.execute("PREPARE listing_generic AS " + statement.query)
        try:
            found = await conn.fetchval(
                f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE listing_generic ({', '.join(literals)})"
            )
        finally:
            await conn.execute("DEALLOCATE listing_generic")
    plan: dict[str, Any] = json.loads(found)[0]["Plan"]
    return plan


def _scans(node: dict[str, Any]) -> Iterator[tuple[str, int]]:
    """Each scan of the plan and the rows it read: returned plus removed by its filters, all loops."""
    if "Scan" in node["Node Type"]:
        per_loop = node["Actual Rows"] + node.get("Rows Removed by Filter", 0)
        per_loop += node.get("Rows Removed by Index Recheck", 0)
        where = node.get("Index Name") or node.get("Relation Name") or node.get("Function Name", "")
        yield f"{node['Node Type']} on {where}", round(per_loop * node["Actual Loops"])
    for child in node.get("Plans", []):
        yield from _scans(child)


async def test_a_listing_page_reads_a_page_of_rows_whatever_the_tenants_size(database: Dsns) -> None:
    owner = await asyncpg.connect(database.owner)
    try:
        await load(owner, "globex", 1000)  # the same names in another tenant: never listed
        tenant = await load(owner, "acme", THREADS)
        cursors = {probe.name: await cursor_of(owner, tenant, probe) for probe in PROBES}
        pages = {probe.name: await expected(owner, tenant, probe, cursors[probe.name], PAGE) for probe in PROBES}
    finally:
        await owner.close()

    db = await Database.connect(database.app, min_size=1, max_size=1)
    try:
        report, too_many = [], []
        for probe in PROBES:
            async with db.transaction(tenant) as tx:
                assert len(pages[probe.name]) == probe.holds, probe.name
                assert await list_page(tx, probe, cursors[probe.name]) == pages[probe.name], probe.name
                statement = await _statement(tenant, probe, cursors[probe.name])
                for generic in (False, True):
                    plan = await _explain(tx, statement, generic=generic)
                    scans = list(_scans(plan))
                    total = sum(read for _, read in scans)
                    kind = "generic" if generic else "custom"
                    report.append(f"{probe.name}, {kind} plan: {plan['Actual Total Time']:.1f} ms, {total} rows read")
                    too_many += [(probe.name, kind, scan, read) for scan, read in scans if read > MOST_READ]
                    if total > MOST_READ_IN_ALL:
                        too_many.append((probe.name, kind, "all scans", total))
    finally:
        await db.close()
    print("\n".join(report))  # with -s: the figures
    assert too_many == [], f"more rows read than a page of {PAGE} needs: {too_many}"


_THREAD_AT = """
    INSERT INTO threads (tenant_id, id, patient, subject, priority, created_by, created_at)
    VALUES ($1, gen_random_uuid(), 'Patient/1', '\\x00', 'routine', 'Patient/1', $2) RETURNING id
"""


async def test_participants_carry_their_threads_creation_time_from_before_the_migration_and_after(
    empty_database: Dsns,
) -> None:
    known = load_migrations()
    before = next(i for i, m in enumerate(known) if m.name == "thread_listing_indexes")
    owner = await asyncpg.connect(empty_database.owner)
    try:
        await migrate(owner, known[:before])
        tenant = await owner.fetchval("INSERT INTO tenants (slug) VALUES ('acme') RETURNING id")
        old = await owner.fetchval(_THREAD_AT, tenant, datetime(2026, 1, 2, tzinfo=UTC))
        await owner.execute(
            "INSERT INTO thread_participants (tenant_id, thread_id, participant) VALUES ($1, $2, 'Practitioner/7')",
            tenant,
            old,
        )
        await migrate(owner, known)
        new = await owner.fetchval(_THREAD_AT, tenant, datetime(2026, 3, 4, tzinfo=UTC))
        await owner.execute(  # whatever a writer says, the thread's own time is kept
            "INSERT INTO thread_participants (tenant_id, thread_id, participant, thread_created_at) "
            "VALUES ($1, $2, 'Practitioner/7', '1999-01-01'), ($1, $2, 'CareTeam/3', NULL)",
            tenant,
            new,
        )
        rows = await owner.fetch(
            "SELECT p.thread_id, p.thread_created_at FROM thread_participants p ORDER BY p.thread_created_at"
        )
    finally:
        await owner.close()
    assert [(r["thread_id"], r["thread_created_at"]) for r in rows] == [
        (old, datetime(2026, 1, 2, tzinfo=UTC)),
        (new, datetime(2026, 3, 4, tzinfo=UTC)),
        (new, datetime(2026, 3, 4, tzinfo=UTC)),
    ]
