"""A page of `GET /v1/threads` against the tenant's size: milliseconds per page.

    .venv/bin/python tests/perf/bench_listing.py [--threads 100000] [--pages 200]

Starts its own PostgreSQL (durable, as in production) in /tmp, migrates, and loads one tenant with
`--threads` threads shaped as for tests/store/test_thread_listing_plans.py (`tests/store/listing_helpers.py`:
a patient has one in 200 of them, Patient/few three; Practitioner/7 takes part in one in 25 through
himself and his two care teams). Then, for each of that test's listings, it fetches the page `--pages`
times as the service does: `MessagingStore.list_threads` in a tenant-scoped transaction of the
application role (RLS included), on one pooled connection whose statement cache keeps the statement
prepared, so after five runs PostgreSQL may settle on a generic plan, as it may for the service. It
reports p50 and p99 of one page, BEGIN and COMMIT included, after 10 unmeasured pages. The pages are
checked against the same listing written the plain way.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import asyncpg

from service.embedded import APP_LOGIN_ROLE, Connection, EmbeddedPostgres
from service.store.bootstrap import ensure_database, prepare_database
from service.store.db import Database
from tests.store.listing_helpers import PAGE, PROBES, cursor_of, expected, list_page, load


async def run(args: argparse.Namespace, connection: Connection) -> None:
    await ensure_database(connection.dsn(owner=True, database="postgres"), "bedside")
    await prepare_database(connection.dsn(owner=True, database="bedside"), APP_LOGIN_ROLE, connection.app_password)
    owner = await asyncpg.connect(connection.dsn(owner=True, database="bedside"))
    started = time.monotonic()
    tenant = await load(owner, "bench", args.threads)
    await owner.execute("VACUUM ANALYZE")
    print(f"load: {time.monotonic() - started:.0f} s; {args.threads:,} threads (and 3) in one tenant")
    cursors = {probe.name: await cursor_of(owner, tenant, probe) for probe in PROBES}
    pages = {probe.name: await expected(owner, tenant, probe, cursors[probe.name], PAGE) for probe in PROBES}
    await owner.close()

    db = await Database.connect(connection.dsn(database="bedside"), min_size=1, max_size=1)
    try:
        print(f"\nms per page of {PAGE - 1} (+1), {args.pages} pages each:")
        for probe in PROBES:
            times = []
            for i in range(10 + args.pages):
                t0 = time.perf_counter()
                async with db.transaction(tenant) as tx:
                    page = await list_page(tx, probe, cursors[probe.name])
                if i >= 10:
                    times.append(1000 * (time.perf_counter() - t0))
                assert page == pages[probe.name], probe.name
            times.sort()
            print(
                f"  {probe.name}: p50 {statistics.median(times):.2f}, p99 {times[int(0.99 * len(times))]:.2f}"
                f" ({len(page)} threads a page)"
            )
    finally:
        await db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=100_000)
    parser.add_argument("--pages", type=int, default=200)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bedside-bench-listing-"))
    os.chmod(work, 0o711)
    pg = EmbeddedPostgres(work)
    connection = pg.start()
    try:
        asyncio.run(run(args, connection))
    finally:
        pg.stop()
        shutil.rmtree(pg.pgdata.parent, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
