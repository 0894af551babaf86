"""`decide` latency and throughput with a million consent events in the ledger.

    .venv/bin/python tests/perf/bench_consent.py [--events 1000000] [--decisions 5000] [--concurrency 16]

Starts its own PostgreSQL (durable, as in production) in /tmp, migrates, loads `--events` consent events
(ten successive grants per key, over 100,000 patients, 20,000 practitioners and 500 care teams, with the derived state
table filled the same way the ledger fills it), then times `ConsentLedger.decide` as the service calls it:
in a tenant-scoped transaction of the application role, RLS included. Reports p50/p99 of one decision
(one at a time) and decisions/s at the given concurrency, plus the EXPLAIN of the lookup.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from crypto.dek_cache import DataKeyCache
from crypto.kek_file import LocalKeyFileProvider
from service.domain.audit import AuditRecorder
from service.domain.consents import ConsentLedger, Scope
from service.domain.idempotency import RequestFingerprints
from service.domain.keyring import KekClient, PatientKeyring
from service.embedded import APP_LOGIN_ROLE, Connection, EmbeddedPostgres
from service.store.audit import AuditStore
from service.store.bootstrap import ensure_database, prepare_database
from service.store.consents import ConsentStore
from service.store.data_keys import DataKeyStore
from service.store.db import Database
from service.store.idempotency import IdempotencyStore

LOAD = """
WITH tenant AS (SELECT id FROM tenants WHERE slug = 'bench')
INSERT INTO consent_events (tenant_id, id, patient, grantee, scope, item, kind, revokes, evidence, recorded_by,
                            recorded_role, recorded_at, version, hash)
SELECT tenant.id, gen_random_uuid(), 'Patient/' || (g % 100000),
       CASE WHEN g % 10 = 0 THEN 'CareTeam/' || (g % 500) ELSE 'Practitioner/' || (g % 20000) END,
       'messaging', '', 'grant', NULL, '{"method":"portal","text_version":"v1"}', 'Patient/' || (g % 100000),
       'patient', now() - make_interval(secs => ($2::bigint - g)::double precision), 1 + (g / 100000),
       sha256(int8send(g))
FROM tenant, generate_series($1::bigint, $1::bigint + $3::bigint - 1) AS g
ON CONFLICT DO NOTHING
"""
STATE = """
INSERT INTO consent_state (tenant_id, patient, grantee, scope, item, event_id, kind, valid_from, valid_until,
                           include_sensitive, version)
SELECT DISTINCT ON (tenant_id, patient, scope, grantee, item) tenant_id, patient, grantee, scope, item, id, kind,
       valid_from, valid_until, include_sensitive, version
FROM consent_events ORDER BY tenant_id, patient, scope, grantee, item, version DESC
ON CONFLICT DO NOTHING
"""


async def run(args: argparse.Namespace, connection: Connection, work: Path) -> None:
    await ensure_database(connection.dsn(owner=True, database="postgres"), "bedside")
    await prepare_database(connection.dsn(owner=True, database="bedside"), APP_LOGIN_ROLE, connection.app_password)
    import asyncpg

    owner = await asyncpg.connect(connection.dsn(owner=True, database="bedside"))
    tenant_id = await owner.fetchval("INSERT INTO tenants (slug) VALUES ('bench') RETURNING id")
    await owner.execute(
        "INSERT INTO care_team_members (tenant_id, team, member) "
        "SELECT $1, 'CareTeam/' || (g % 500), 'Practitioner/' || g FROM generate_series(1, 20000) g",
        tenant_id,
    )
    started = time.monotonic()
    chunk = 250_000
    for first in range(0, args.events, chunk):
        await owner.execute(LOAD, first, args.events, min(chunk, args.events - first))
        print(f"  loaded {min(first + chunk, args.events):,} events", flush=True)
    await owner.execute(STATE)
    await owner.execute("VACUUM ANALYZE consent_events")
    await owner.execute("VACUUM ANALYZE consent_state")
    await owner.execute("VACUUM ANALYZE care_team_members")
    events = await owner.fetchval("SELECT count(*) FROM consent_events")
    states = await owner.fetchval("SELECT count(*) FROM consent_state")
    print(f"load: {time.monotonic() - started:.0f} s; events {events:,}, state rows {states:,}")
    plan = await owner.fetch(
        "EXPLAIN (ANALYZE, BUFFERS) " + ConsentStore._DECIDE,
        tenant_id,
        "Patient/42",
        "messaging",
        "Practitioner/42",
        "",
    )
    await owner.close()

    db = await Database.connect(
        connection.dsn(database="bedside"), min_size=args.concurrency, max_size=args.concurrency
    )
    kek = KekClient(LocalKeyFileProvider(work / "kek.key", create=True))
    fingerprints = RequestFingerprints(PatientKeyring(DataKeyStore(), kek, DataKeyCache()))
    ledger = ConsentLedger(
        db, ConsentStore(), IdempotencyStore(), AuditRecorder(AuditStore(), db), fingerprints=fingerprints
    )
    rng = random.Random(7)

    async def one() -> float:
        patient = f"Patient/{rng.randrange(100000)}"
        grantee = f"Practitioner/{rng.randrange(20000)}"
        t0 = time.perf_counter()
        async with db.transaction(tenant_id) as tx:
            await ledger.decide(tx, patient, grantee, Scope.MESSAGING)
        return time.perf_counter() - t0

    for _ in range(200):
        await one()
    single = [await one() for _ in range(args.decisions)]
    single.sort()
    print(
        f"\none at a time: p50 {1000 * statistics.median(single):.3f} ms, "
        f"p99 {1000 * single[int(0.99 * len(single))]:.3f} ms (each in its own transaction: BEGIN + lookup + COMMIT)"
    )

    done = 0

    async def worker(deadline: float) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await one()
            done += 1

    deadline = time.perf_counter() + 10
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(deadline) for _ in range(args.concurrency)))
    print(f"throughput at concurrency {args.concurrency}: {done / (time.perf_counter() - t0):,.0f} decisions/s")
    print("\nEXPLAIN (ANALYZE) of the decision lookup:")
    for row in plan:
        print("  " + row[0])
    await db.close()
    kek.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--decisions", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bedside-bench-consent-"))
    os.chmod(work, 0o711)
    pg = EmbeddedPostgres(work)
    connection = pg.start()
    try:
        asyncio.run(run(args, connection, work))
    finally:
        pg.stop()
        shutil.rmtree(pg.pgdata.parent, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
