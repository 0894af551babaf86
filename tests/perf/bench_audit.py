"""The audit log's throughput and query latency, on a durable PostgreSQL cluster of its own.

    .venv/bin/python tests/perf/bench_audit.py [--events 50000] [--query-events 10000000] [--queries 200] [--keep]

It starts an embedded PostgreSQL in /tmp with fsync on (as production), migrates two databases and measures:

1. Integration. `--events` realistic events (several tenants, patients, actors, actions), each a real
   canonical entry built by `AuditRecorder`, are written to the outbox as the application role; then
   `AuditLog.integrate` runs in a loop until the outbox is empty, with a real Ed25519 signer: events/s and
   ms per batch. Then the service's `Sequencer` (interval 0.25 s) runs while a trickle of events commits
   one transaction each: seconds from commit to the leaf being visible (the requirement: within 2 s).
2. Verification: `verify_database` over that log, as the owner: events/s.
3. Filtered queries at `--query-events` leaves, generated with SQL in chunks (entries and leaf hashes are
   synthetic there: it measures the indexes, not verification). After VACUUM ANALYZE, `AuditStore.events`
   runs in tenant-scoped transactions as the application role (row-level security on), for a patient, an
   actor, an action within one week, and a patient's second page, on one connection (so asyncpg's
   statement cache and PostgreSQL's plan cache behave as in the service: after five custom plans a
   statement usually runs a generic one). p50/p99 ms, and EXPLAIN of one query of each kind, both plans.
   A kind whose p99 exceeds 50 ms fails the run, and its slowest query is explained too.

The cluster is removed at the end unless --keep (then it keeps running, and how to stop it is printed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast
from uuid import UUID

import asyncpg
import structlog

from crypto.checkpoint import Ed25519CheckpointSigner
from service.domain.audit import REQUEST_META, AuditAction, AuditEvent, AuditRecorder, Outcome, RequestMeta
from service.domain.audit_log import AuditLog
from service.domain.audit_verify import verify_database
from service.embedded import APP_LOGIN_ROLE, Connection, EmbeddedPostgres
from service.store.audit import AuditStore, EventFilter, OutboxRow
from service.store.bootstrap import ensure_database, prepare_database
from service.store.db import Database, Tx
from service.workers.sequencer import Sequencer

ORIGIN = "bench.bedside.test/audit"
LOG_DB = "bench_log"
QUERY_DB = "bench_query"
SLOW_MS = 50.0
PAGE = 100

# Resource settings for a 24 GiB machine (the defaults are sized for a laptop from 2005). Durability is
# untouched: fsync, synchronous_commit and full_page_writes stay on.
SERVER_TUNING = {
    "shared_buffers": "6GB",
    "max_wal_size": "16GB",
    "checkpoint_timeout": "30min",
    "maintenance_work_mem": "1GB",
}

# How often each action happens (all twelve codes). Denials are rare, so outcomes are mostly success.
ACTION_WEIGHTS: dict[AuditAction, float] = {
    AuditAction.KEY_STATUS: 0.30,
    AuditAction.AUDIT_QUERY: 0.22,
    AuditAction.KEY_REWRAP: 0.12,
    AuditAction.ISSUER_LIST: 0.08,
    AuditAction.KEY_ROTATE: 0.06,
    AuditAction.AUDIT_EXPORT: 0.05,
    AuditAction.ACCESS_DENIED: 0.04,
    AuditAction.AUTH_DENIED: 0.03,
    AuditAction.KEY_SHRED: 0.03,
    AuditAction.KEY_RETIRE: 0.03,
    AuditAction.ISSUER_ADD: 0.02,
    AuditAction.TENANT_CREATE: 0.02,
}
ROLES = ["physician"] * 14 + ["staff"] * 4 + ["compliance", "admin"]


def say(message: str) -> None:
    print(message, flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile, linearly interpolated between the closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    k = (len(ordered) - 1) * q / 100
    low, high = math.floor(k), math.ceil(k)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def zipf_weights(n: int, s: float) -> list[float]:
    raw = [1 / (i + 1) ** s for i in range(n)]
    total = sum(raw)
    return [w / total for w in raw]


def cumulative(weights: Sequence[float]) -> list[float]:
    """Bucket boundaries for width_bucket: the running sums, without the final 1.0."""
    out, running = [], 0.0
    for w in weights[:-1]:
        running += w
        out.append(running)
    return out


@dataclass
class Summary:
    rows: list[tuple[str, str]] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def add(self, metric: str, value: str) -> None:
        self.rows.append((metric, value))
        say(f"  {metric}: {value}")

    def print(self) -> None:
        if not self.rows:
            return
        width = max(len(m) for m, _ in self.rows)
        say("\n" + "=" * 100)
        for metric, value in self.rows:
            say(f"{metric:<{width}}  {value}")
        for failure in self.failed:
            say(f"FAILED: {failure}")
        say("=" * 100)


# -- the cluster ----------------------------------------------------------------------------------


def start_cluster(pg: EmbeddedPostgres, tune: bool) -> Connection:
    connection = pg.start(durable=True)
    if not tune:
        return connection

    async def alter(connection: Connection) -> None:
        conn = await asyncpg.connect(connection.dsn(owner=True, database="postgres"))
        try:
            for name, value in SERVER_TUNING.items():
                # ALTER SYSTEM takes no parameters; both parts are constants of this file.
                await conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
        finally:
            await conn.close()

    asyncio.run(alter(connection))
    pg.stop()
    return pg.start(durable=True)


async def create_database(connection: Connection, name: str) -> None:
    await ensure_database(connection.dsn(owner=True, database="postgres"), name)
    await prepare_database(connection.dsn(owner=True, database=name), APP_LOGIN_ROLE, connection.app_password)


async def create_tenants(owner_dsn: str, count: int) -> list[UUID]:
    conn = await asyncpg.connect(owner_dsn)
    try:
        rows = await conn.fetch(
            "INSERT INTO tenants (slug) SELECT 'tenant-' || i FROM generate_series(1, $1) AS i RETURNING id", count
        )
        return [r["id"] for r in rows]
    finally:
        await conn.close()


# -- 1. integration -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Population:
    """Tenants of skewed sizes; patients and actors per tenant in proportion, each used with a skew."""

    tenants: list[UUID]
    weights: list[float]
    patients: int
    actors: int

    def event(self, rng: random.Random) -> AuditEvent:
        t = rng.choices(range(len(self.tenants)), self.weights)[0]
        tenant = self.tenants[t]
        action = rng.choices(list(ACTION_WEIGHTS), list(ACTION_WEIGHTS.values()))[0]
        patients = max(1, round(self.patients * self.weights[t]))
        actors = max(1, round(self.actors * self.weights[t]))
        patient = f"Patient/{int(patients * rng.random() ** 2.5)}" if rng.random() < 0.85 else None
        actor_no = int(actors * rng.random() ** 2)
        issuer = f"https://portal.tenant-{t}.example"
        if action is AuditAction.AUTH_DENIED:
            # Before authentication: no actor, and now and then not even a known tenant.
            return AuditEvent(
                action=action,
                tenant_id=tenant if rng.random() < 0.8 else None,
                issuer=issuer,
                resource_type="Route",
                resource_id="list_messages",
            ).denied(rng.choice(["expired", "signature", "audience"]))
        kind, _, verb = action.value.partition(":")
        resource_type, resource_id, details = {
            "key": ("DataKey", f"{rng.getrandbits(64):016x}", {"kek_version": rng.randint(1, 4)}),
            "audit": ("AuditLog", None, {"query": "events", "returned": rng.randint(0, 100)}),
            "issuer": ("Issuer", issuer, {"kid": f"{rng.getrandbits(32):08x}"}),
            "tenant": ("Tenant", f"tenant-{t}", {}),
            "access": ("Route", "get_patient_messages", {}),
        }[kind]
        event = AuditEvent(
            action=action,
            outcome=Outcome.FAILURE if rng.random() < 0.015 else Outcome.SUCCESS,
            tenant_id=tenant,
            actor=f"Practitioner/{t * 100_000 + actor_no}",
            actor_role=ROLES[actor_no % len(ROLES)],
            issuer=issuer,
            patient=patient,
            resource_type=resource_type,
            resource_id=resource_id,
            purpose="treatment" if patient else None,
            details=details,
        )
        return event.denied("role") if verb == "denied" else event


def outbox_args(row: OutboxRow) -> tuple[Any, ...]:
    return (
        row.event_id,
        row.occurred_at,
        row.tenant_id,
        row.action,
        row.outcome,
        row.actor,
        row.actor_role,
        row.issuer,
        row.act_for,
        row.patient,
        row.resource_type,
        row.resource_id,
        row.purpose,
        row.request_id,
        row.source,
        row.details,
        row.entry,
    )


def build_rows(recorder: AuditRecorder, population: Population, count: int, rng: random.Random) -> list[OutboxRow]:
    rows = []
    for _ in range(count):
        token = REQUEST_META.set(RequestMeta(f"{rng.getrandbits(128):032x}", f"10.{rng.randrange(256)}.0.7"))
        try:
            # The recorder's own row builder: a real event id, clock and canonical entry.
            rows.append(recorder._row(population.event(rng)))
        finally:
            REQUEST_META.reset(token)
    return rows


async def fill_outbox(db: Database, rows: list[OutboxRow], chunk: int = 500) -> None:
    """Insert as the application role, one task per tenant, `chunk` events per transaction."""
    by_tenant: dict[UUID | None, list[OutboxRow]] = defaultdict(list)
    for row in rows:
        by_tenant[row.tenant_id].append(row)

    async def insert(tenant: UUID | None, mine: list[OutboxRow]) -> None:
        for start in range(0, len(mine), chunk):
            async with db.transaction(tenant) as tx:
                await tx.conn.executemany(AuditStore._INSERT, [outbox_args(r) for r in mine[start : start + chunk]])

    await asyncio.gather(*(insert(tenant, mine) for tenant, mine in by_tenant.items()))


async def bench_integrate(db: Database, audit_log: AuditLog, summary: Summary) -> None:
    batches: list[tuple[int, float]] = []
    async with db.session() as conn:
        started = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            n = await audit_log.integrate(conn)
            if n == 0:
                break
            batches.append((n, time.perf_counter() - t0))
        elapsed = time.perf_counter() - started
    total = sum(n for n, _ in batches)
    full = [dt * 1000 for n, dt in batches if n == audit_log.batch] or [dt * 1000 for _, dt in batches]
    tenth = max(1, len(full) // 10)
    summary.add("integrate: throughput", f"{total / elapsed:,.0f} events/s ({total:,} events in {elapsed:.1f} s)")
    summary.add(
        f"integrate: ms per {audit_log.batch}-event batch",
        f"median {percentile(full, 50):.1f}, p99 {percentile(full, 99):.1f}, max {max(full):.1f} "
        f"(first tenth median {percentile(full[:tenth], 50):.1f}, last tenth {percentile(full[-tenth:], 50):.1f})",
    )


async def bench_commit_to_integrated(
    app_db: Database,
    owner_dsn: str,
    recorder: AuditRecorder,
    population: Population,
    audit_log: AuditLog,
    *,
    rate: float,
    seconds: float,
    summary: Summary,
) -> None:
    """Open-loop trickle: one event per transaction every 1/rate s while the service's Sequencer runs; an
    observer polls the leaves every 10 ms (so latencies are up to 10 ms pessimistic)."""
    rng = random.Random(7)
    committed: dict[UUID, float] = {}
    seen: dict[UUID, float] = {}
    produced, caught_up = asyncio.Event(), asyncio.Event()
    sequencer = asyncio.create_task(Sequencer(app_db, audit_log, interval=0.25).run())
    observer_conn = await asyncpg.connect(owner_dsn)
    start_size = int(await observer_conn.fetchval("SELECT size FROM audit_tree_state"))

    async def observe() -> None:
        next_seq = start_size
        while True:
            rows = await observer_conn.fetch(
                "SELECT seq, event_id FROM audit_leaves WHERE seq >= $1 ORDER BY seq", next_seq
            )
            now = time.perf_counter()
            for r in rows:
                seen.setdefault(r["event_id"], now)
                next_seq = r["seq"] + 1
            if produced.is_set() and committed.keys() <= seen.keys():
                caught_up.set()
            await asyncio.sleep(0.01)

    async def one() -> None:
        token = REQUEST_META.set(RequestMeta(f"{rng.getrandbits(128):032x}", "10.9.0.7"))
        try:
            event_id = await recorder.record_alone(population.event(rng))
        finally:
            REQUEST_META.reset(token)
        committed[event_id] = time.perf_counter()

    observer = asyncio.create_task(observe())
    count = int(rate * seconds)
    writers: list[asyncio.Task[None]] = []
    try:
        await asyncio.sleep(0.5)  # let the sequencer take the lead
        began = time.perf_counter()
        for i in range(count):
            delay = began + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            writers.append(asyncio.create_task(one()))
        await asyncio.gather(*writers)
        produced.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(caught_up.wait(), 30)
    finally:
        for task in (observer, sequencer):
            task.cancel()
        await asyncio.gather(observer, sequencer, return_exceptions=True)
        await observer_conn.close()
    latencies = [max(0.0, seen[e] - t) for e, t in committed.items() if e in seen]
    missing = len(committed) - len(latencies)
    within = sum(1 for s in latencies if s <= 2.0)
    summary.add(
        "commit→integrated (Sequencer, 0.25 s)",
        f"p50 {percentile(latencies, 50):.3f} s, p99 {percentile(latencies, 99):.3f} s, max {max(latencies):.3f} s; "
        f"{within}/{len(committed)} within 2 s ({count} events at {rate:g}/s)",
    )
    if missing or within < len(committed):
        summary.failed.append(f"{len(committed) - within} events not integrated within 2 s of commit")


# -- 3. filtered queries --------------------------------------------------------------------------

# Synthetic leaves, one chunk of seq [$1, $2): skewed tenants (width_bucket over cumulative weights),
# patients and actors per tenant (u^2.5 and u^2: a long tail with a few very busy ones), the twelve
# actions, outcomes mostly success, occurred_at spread over the year in seq order. OFFSET 0 keeps each
# random() evaluated once per row (a subquery with volatile output is not flattened).
LOAD_CHUNK = """
INSERT INTO audit_leaves (seq, leaf_hash, integrated_at, event_id, occurred_at, tenant_id, action, outcome, actor,
                          actor_role, issuer, act_for, patient, resource_type, resource_id, purpose, request_id,
                          source, details, entry)
SELECT e.g, sha256('\\x00'::bytea || e.entry), e.occurred_at + interval '150 milliseconds', gen_random_uuid(),
       e.occurred_at, e.tenant_id, e.action, e.outcome, e.actor, e.actor_role, e.issuer, NULL, e.patient,
       e.resource_type,
       CASE e.resource_type WHEN 'DataKey' THEN md5(e.g::text) WHEN 'Issuer' THEN e.issuer
                            WHEN 'Tenant' THEN 'tenant-' || e.t WHEN 'Route' THEN 'get_patient_messages' END,
       CASE WHEN e.patient IS NOT NULL THEN 'treatment' END,
       md5(e.g::text || 'request'),
       '10.' || (e.g % 7) || '.' || (e.g % 251) || '.7',
       CASE e.action WHEN 'audit:query' THEN jsonb_build_object('query', 'events', 'returned', e.g % 101)
                     WHEN 'key:rotate' THEN '{"kek_version": 2}'::jsonb
                     WHEN 'access:denied' THEN '{"reason": "role"}'::jsonb
                     WHEN 'auth:denied' THEN '{"reason": "expired"}'::jsonb
                     ELSE '{}'::jsonb END,
       e.entry
FROM (
    SELECT a.*,
           CASE split_part(a.action, ':', 1) WHEN 'key' THEN 'DataKey' WHEN 'audit' THEN 'AuditLog'
                WHEN 'issuer' THEN 'Issuer' WHEN 'tenant' THEN 'Tenant' ELSE 'Route' END AS resource_type,
           CASE WHEN a.action IN ('auth:denied', 'access:denied') THEN 'denied'
                WHEN a.u_outcome < 0.015 THEN 'failure' ELSE 'success' END AS outcome,
           CASE WHEN a.action <> 'auth:denied' THEN 'Practitioner/' || (a.t * 100000 + a.actor_no) END AS actor,
           CASE WHEN a.action <> 'auth:denied' THEN ($11::text[])[a.actor_no % array_length($11::text[], 1) + 1]
           END AS actor_role
    FROM (
        SELECT r.g, r.t, r.u_outcome,
               ($4::uuid[])[r.t + 1] AS tenant_id,
               ($10::text[])[width_bucket(r.u_action, $9::float8[]) + 1] AS action,
               CASE WHEN r.u_has_patient < 0.85
                    THEN 'Patient/' || floor(($6::int[])[r.t + 1] * power(r.u_patient, 2.5))::int END AS patient,
               floor(($7::int[])[r.t + 1] * power(r.u_actor, 2))::int AS actor_no,
               'https://portal.tenant-' || r.t || '.example' AS issuer,
               $8::timestamptz + make_interval(secs => r.g * 31536000.0 / $3) AS occurred_at,
               $12::bytea || int8send(r.g) AS entry
        FROM (
            SELECT g, width_bucket(random(), $5::float8[]) AS t, random() AS u_patient, random() AS u_actor,
                   random() AS u_action, random() AS u_outcome, random() AS u_has_patient
            FROM generate_series($1::bigint, $2::bigint - 1) AS g
            OFFSET 0
        ) r
        OFFSET 0
    ) a
    OFFSET 0
) e
"""


@dataclass(frozen=True)
class QueryData:
    tenants: list[UUID]
    year_start: datetime
    rows: int


async def load_leaves(
    owner_dsn: str, total: int, *, tenants: int, patients: int, actors: int, chunk: int, workers: int
) -> QueryData:
    ids = await create_tenants(owner_dsn, tenants)
    weights = zipf_weights(tenants, 0.8)
    year_start = (datetime.now(UTC) - timedelta(days=365)).replace(hour=0, minute=0, second=0, microsecond=0)
    pad = (b"synthetic bedside-audit/1 entry; " * 15)[:480]  # real entries are ~450-600 bytes
    params = [
        total,
        ids,
        cumulative(weights),
        [max(1, round(patients * w)) for w in weights],
        [max(1, round(actors * w)) for w in weights],
        year_start,
        cumulative(list(ACTION_WEIGHTS.values())),
        [a.value for a in ACTION_WEIGHTS],
        ROLES,
        pad,
    ]
    chunks = [(lo, min(total, lo + chunk)) for lo in range(0, total, chunk)]
    queue: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
    for c in chunks:
        queue.put_nowait(c)
    done = 0
    started = time.perf_counter()

    async def worker() -> None:
        nonlocal done
        conn = await asyncpg.connect(owner_dsn)
        try:
            await conn.execute("SELECT setseed($1)", random.random())
            while not queue.empty():
                lo, hi = queue.get_nowait()
                await conn.execute(LOAD_CHUNK, lo, hi, *params)
                done += hi - lo
                elapsed = time.perf_counter() - started
                rate = done / elapsed
                say(
                    f"  loaded {done:>11,} / {total:,} leaves ({rate:,.0f}/s, {elapsed:.0f} s, "
                    f"eta {(total - done) / rate:.0f} s)"
                )
        finally:
            await conn.close()

    await asyncio.gather(*(worker() for _ in range(min(workers, len(chunks)))))
    return QueryData(ids, year_start, total)


class _Capture:
    """Hands queries on to the connection and keeps the last one, so EXPLAIN shows exactly what ran."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self.query = ""
        self.args: tuple[Any, ...] = ()

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        self.query, self.args = query, args
        return cast(list[asyncpg.Record], await self._conn.fetch(query, *args))


@dataclass(frozen=True)
class Probe:
    """One query of one kind: a tenant, a filter and a cursor."""

    tenant: UUID
    where: EventFilter
    after: int | None = None


async def run_probe(db: Database, store: AuditStore, probe: Probe) -> tuple[float, int]:
    async with db.transaction(probe.tenant) as tx:
        t0 = time.perf_counter()
        items = await store.events(tx, probe.tenant, probe.where, after=probe.after, newest_first=True, limit=PAGE)
        return (time.perf_counter() - t0) * 1000, len(items)


async def captured(tx: Tx, store: AuditStore, probe: Probe) -> _Capture:
    """The exact SQL and arguments `AuditStore.events` sends for `probe`."""
    capture = _Capture(tx.conn)
    await store.events(
        Tx(conn=cast(Any, capture), tenant_id=probe.tenant),
        probe.tenant,
        probe.where,
        after=probe.after,
        newest_first=True,
        limit=PAGE,
    )
    return capture


async def explain(db: Database, store: AuditStore, probe: Probe, *, generic: bool) -> list[str]:
    """EXPLAIN (ANALYZE, BUFFERS) of the query, as a custom plan (planned for these values: the first
    five executions of a statement) or as the generic plan a cached prepared statement may settle on
    (asyncpg caches statements, so the service runs those)."""
    async with db.transaction(probe.tenant) as tx:
        capture = await captured(tx, store, probe)
        if not generic:
            rows = await tx.conn.fetch("EXPLAIN (ANALYZE, BUFFERS) " + capture.query, *capture.args)
            return [r[0] for r in rows]
        # EXPLAIN EXECUTE takes no bind parameters: the server quotes the values as literals.
        literals = [await tx.conn.fetchval("SELECT pg_catalog.quote_literal($1::text)", str(a)) for a in capture.args]
        await tx.conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        await tx.conn.execute("PREPARE bench_generic AS " + capture.query)
        try:
            rows = await tx.conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) EXECUTE bench_generic ({', '.join(literals)})")
        finally:
            await tx.conn.execute("DEALLOCATE bench_generic")
    return [r[0] for r in rows]


async def plans_used(db: Database, store: AuditStore, probe: Probe) -> tuple[int, int]:
    """(generic, custom) plans PostgreSQL used for this query's cached statement on the pool's connection."""
    async with db.transaction(probe.tenant) as tx:
        capture = await captured(tx, store, probe)
        row = await tx.conn.fetchrow(
            "SELECT generic_plans, custom_plans FROM pg_catalog.pg_prepared_statements WHERE statement = $1",
            capture.query,
        )
    return (0, 0) if row is None else (row["generic_plans"], row["custom_plans"])


async def print_plans(db: Database, store: AuditStore, probe: Probe, title: str) -> None:
    for generic in (False, True):
        say(f"    EXPLAIN (ANALYZE, BUFFERS), {title}, {'generic' if generic else 'custom'} plan:")
        for line in await explain(db, store, probe, generic=generic):
            say(f"      {line}")


async def make_probes(owner_dsn: str, data: QueryData, queries: int, seed: int) -> dict[str, list[Probe]]:
    """Targets drawn from random leaves, so busy patients and actors are asked about more often, as in use."""
    rng = random.Random(seed)
    conn = await asyncpg.connect(owner_dsn)
    try:
        seqs = [rng.randrange(data.rows) for _ in range(queries * 30)]
        rows = await conn.fetch(
            "SELECT seq, tenant_id, patient, actor, action FROM audit_leaves WHERE seq = ANY($1::bigint[])", seqs
        )
    finally:
        await conn.close()
    rng.shuffle(rows)
    with_patient = [r for r in rows if r["patient"] is not None]
    with_actor = [r for r in rows if r["actor"] is not None]
    weeks = []
    for r in rows[:queries]:
        since = data.year_start + timedelta(seconds=rng.uniform(0, 358 * 86400))
        weeks.append(
            Probe(r["tenant_id"], EventFilter(action=r["action"], since=since, until=since + timedelta(days=7)))
        )
    return {
        "patient": [Probe(r["tenant_id"], EventFilter(patient=r["patient"])) for r in with_patient[:queries]],
        "actor": [Probe(r["tenant_id"], EventFilter(actor=r["actor"])) for r in with_actor[:queries]],
        "action+week": weeks,
        # Page 2 candidates: the remaining patients; kept where the first page was full.
        "patient page 2": [Probe(r["tenant_id"], EventFilter(patient=r["patient"])) for r in with_patient[queries:]],
    }


async def second_pages(db: Database, store: AuditStore, candidates: list[Probe], wanted: int) -> list[Probe]:
    pages: list[Probe] = []
    for probe in candidates:
        async with db.transaction(probe.tenant) as tx:
            first = await store.events(tx, probe.tenant, probe.where, after=None, newest_first=True, limit=PAGE)
        if len(first) == PAGE:
            pages.append(Probe(probe.tenant, probe.where, after=first[-1].seq))
            if len(pages) == wanted:
                break
    return pages


async def bench_queries(
    connection: Connection, data: QueryData, queries: int, summary: Summary, warmup: int = 10
) -> None:
    owner_dsn = connection.dsn(owner=True, database=QUERY_DB)
    store = AuditStore()
    probes = await make_probes(owner_dsn, data, queries + warmup, seed=11)
    # One connection, so its statement cache and PostgreSQL's plan cache are the ones every query meets.
    db = await Database.connect(connection.dsn(database=QUERY_DB), min_size=1, max_size=1)
    try:
        probes["patient page 2"] = await second_pages(db, store, probes["patient page 2"], queries + warmup)
        for kind, mine in probes.items():
            for probe in mine[:warmup]:  # untimed: the statement is prepared and its plan cache settles
                await run_probe(db, store, probe)
            results = [(probe, *await run_probe(db, store, probe)) for probe in mine[warmup:]]
            if not results:  # a small --query-events: no patient with a full first page, say
                summary.add(f"query {kind:<15}", "no queries: too few matching leaves at this size")
                continue
            ms = [t for _, t, _ in results]
            returned = [n for _, _, n in results]
            p50, p99 = percentile(ms, 50), percentile(ms, 99)
            generic, custom = await plans_used(db, store, mine[0])
            summary.add(
                f"query {kind:<15}",
                f"p50 {p50:7.2f} ms, p99 {p99:7.2f} ms, max {max(ms):7.2f} ms ({len(ms)} queries, median "
                f"{percentile(returned, 50):.0f} rows; plans {generic} generic, {custom} custom)",
            )
            await print_plans(db, store, results[0][0], f"{kind}, the first timed query")
            if p99 > SLOW_MS:
                slowest = max(results, key=lambda x: x[1])[0]
                say(f"    p99 above {SLOW_MS:g} ms; the slowest query was {slowest.where}")
                await print_plans(db, store, slowest, f"{kind}, the slowest query")
                summary.failed.append(f"query {kind}: p99 {p99:.1f} ms > {SLOW_MS:g} ms")
    finally:
        await db.close()


async def relation_sizes(owner_dsn: str) -> str:
    conn = await asyncpg.connect(owner_dsn)
    try:
        rows = await conn.fetch(
            "SELECT c.relname, pg_size_pretty(pg_relation_size(c.oid)) AS size FROM pg_class c "
            "WHERE c.relname LIKE 'audit_leaves%' AND c.relkind IN ('r', 'i') ORDER BY pg_relation_size(c.oid) DESC"
        )
    finally:
        await conn.close()
    return ", ".join(f"{r['relname']} {r['size']}" for r in rows)


# -- the run --------------------------------------------------------------------------------------


async def timed(label: str, work: Awaitable[Any]) -> Any:
    say(f"\n== {label}")
    t0 = time.perf_counter()
    result = await work
    say(f"   ({label}: {time.perf_counter() - t0:.1f} s)")
    return result


async def bench(args: argparse.Namespace, connection: Connection, summary: Summary) -> None:
    # -- 1 and 2: a real log ------------------------------------------------------------------------
    await create_database(connection, LOG_DB)
    owner_dsn = connection.dsn(owner=True, database=LOG_DB)
    app_db = await Database.connect(connection.dsn(database=LOG_DB), min_size=2, max_size=10)
    try:
        tenants = await create_tenants(owner_dsn, 6)
        population = Population(tenants, zipf_weights(len(tenants), 0.8), patients=20_000, actors=2_000)
        store = AuditStore()
        recorder = AuditRecorder(store, app_db)
        signer = Ed25519CheckpointSigner.generate(ORIGIN)
        audit_log = AuditLog(store, signer, origin=ORIGIN)

        rows = build_rows(recorder, population, args.events, random.Random(5))
        await timed(f"filling the outbox with {len(rows):,} recorded events", fill_outbox(app_db, rows))
        await timed("integrating until the outbox is empty", bench_integrate(app_db, audit_log, summary))
        await timed(
            f"commit→integrated: {args.trickle_rate:g} events/s for {args.trickle_seconds:g} s",
            bench_commit_to_integrated(
                app_db,
                owner_dsn,
                recorder,
                population,
                audit_log,
                rate=args.trickle_rate,
                seconds=args.trickle_seconds,
                summary=summary,
            ),
        )
        async with app_db.session() as conn:  # anything the sequencer had not taken yet
            while await audit_log.integrate(conn):
                pass
    finally:
        await app_db.close()

    owner_db = await Database.connect(owner_dsn, min_size=1, max_size=2)
    try:
        say("\n== verify_database as the owner")
        t0 = time.perf_counter()
        result = await verify_database(owner_db, AuditStore(), vkey=signer.verifier_key().to_vkey(), origin=ORIGIN)
        elapsed = time.perf_counter() - t0
    finally:
        await owner_db.close()
    summary.add(
        "verify_database",
        f"{result.leaves / elapsed:,.0f} events/s ({result.leaves:,} leaves, {result.checkpoints:,} checkpoints "
        f"in {elapsed:.1f} s): {'ok' if result.ok else 'FAILED: ' + str(result.problem)}",
    )
    if not result.ok:
        summary.failed.append(f"verify: {result.problem}")

    # -- 3: filtered queries over many synthetic leaves ----------------------------------------------
    await create_database(connection, QUERY_DB)
    query_owner = connection.dsn(owner=True, database=QUERY_DB)
    say("\n   (entries and leaf hashes of these leaves are synthetic: this part measures the indexes)")
    data = await timed(
        f"generating {args.query_events:,} leaves ({args.load_workers} workers, {args.chunk:,} per chunk)",
        load_leaves(
            query_owner,
            args.query_events,
            tenants=20,
            patients=200_000,
            actors=20_000,
            chunk=args.chunk,
            workers=args.load_workers,
        ),
    )

    async def vacuum() -> None:
        conn = await asyncpg.connect(query_owner)
        try:
            await conn.execute("VACUUM (ANALYZE) audit_leaves")
        finally:
            await conn.close()

    await timed("VACUUM (ANALYZE) audit_leaves", vacuum())
    summary.add("query data sizes", await relation_sizes(query_owner))
    await timed(
        f"{args.queries} queries per filter, as the application role (RLS on)",
        bench_queries(connection, data, args.queries, summary),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=50_000, help="events to integrate and verify")
    parser.add_argument("--query-events", type=int, default=10_000_000, help="synthetic leaves to query")
    parser.add_argument("--queries", type=int, default=200, help="timed queries per filter")
    parser.add_argument("--trickle-rate", type=float, default=50.0, help="events/s for commit→integrated")
    parser.add_argument("--trickle-seconds", type=float, default=20.0)
    parser.add_argument("--chunk", type=int, default=1_000_000, help="leaves per INSERT ... SELECT")
    parser.add_argument("--load-workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--no-tune", action="store_true", help="keep PostgreSQL's default memory and WAL sizes")
    parser.add_argument("--keep", action="store_true", help="leave the cluster running in /tmp")
    args = parser.parse_args()
    # The sequencer's own log lines would interleave with the figures; errors still show.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))

    started = time.perf_counter()
    data_dir = Path(tempfile.mkdtemp(prefix="bedside-bench-audit-", dir="/tmp"))
    os.chmod(data_dir, 0o711)  # as root, PostgreSQL runs as `postgres` and must reach it
    pg = EmbeddedPostgres(data_dir)
    summary = Summary()
    try:
        connection = start_cluster(pg, tune=not args.no_tune)
        say(
            f"PostgreSQL ({pg.bindir.parent.name}) in {data_dir}, port {connection.port}, fsync on; "
            + ("default settings" if args.no_tune else ", ".join(f"{k}={v}" for k, v in SERVER_TUNING.items()))
        )
        asyncio.run(bench(args, connection, summary))
    finally:
        summary.add("total run time", f"{time.perf_counter() - started:.0f} s")
        summary.print()
        if args.keep:
            say(
                f"kept: {data_dir} (passwords in its *-password files); stop with\n"
                f"  runuser -u postgres -- {pg.bindir / 'pg_ctl'} stop -D {pg.pgdata} -m fast"
            )
        else:
            pg.stop()
            shutil.rmtree(pg.pgdata.parent, ignore_errors=True)
            shutil.rmtree(data_dir, ignore_errors=True)
    sys.exit(1 if summary.failed else 0)


if __name__ == "__main__":
    main()
