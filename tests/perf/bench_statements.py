"""Where PostgreSQL's time goes in a send and a read, statement by statement (pg_stat_statements).

    apt-get install -y wrk
    .venv/bin/python tests/perf/bench_statements.py [--seconds 8] [--concurrency 16] [--threads 300]

`bench_messaging.py` measures whole requests, and on a shared two-core machine its req/s moves by a third
from one run to the next. This script asks PostgreSQL instead: it starts `bedside serve` on its embedded
PostgreSQL in a temporary directory, sets up patients and threads as `bench_messaging.py` does, restarts
with `pg_stat_statements` loaded (`track_planning` on), then drives sends and reads of 50 with wrk and
prints, per request, each statement's planning and execution time and how often it was planned.

Execution times are wall time inside the executor: at a concurrency that saturates the cores they include
time spent preempted, so compare statements of one run with each other, not across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_messaging as bench  # this directory is not a package

_TOP = """
    SELECT calls, plans, total_plan_time, total_exec_time,
           left(regexp_replace(query, '\\s+', ' ', 'g'), 100) AS query
    FROM pg_stat_statements ORDER BY total_plan_time + total_exec_time DESC LIMIT $1
"""


def _serve(env: dict[str, str]) -> subprocess.Popen[str]:
    service = subprocess.Popen(
        [bench.BEDSIDE, "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    assert service.stdout is not None
    while "curl" not in service.stdout.readline():
        if service.poll() is not None:
            sys.exit("bedside serve did not start")
    return service


def _stop(service: subprocess.Popen[str]) -> None:
    service.send_signal(signal.SIGINT)
    service.wait(timeout=60)


async def _sql(dsn: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--threads", type=int, default=300)
    parser.add_argument("--top", type=int, default=10, help="statements listed per run")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is required: apt-get install -y wrk")

    sys.path.insert(0, str(bench.ROOT))
    from service.embedded import EmbeddedPostgres

    work = Path(tempfile.mkdtemp(prefix="bedside-statements-"))
    os.chmod(work, 0o711)
    data_dir, port = work / "data", bench.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEDSIDE_")}
    env.update(BEDSIDE_DATA_DIR=str(data_dir), BEDSIDE_PORT=str(port), BEDSIDE_LOG_FORMAT="json")
    base, targets = f"http://127.0.0.1:{port}", work / "targets.txt"

    service = _serve(env)
    try:
        print(f"setting up {args.threads} patients, consents and threads ...", flush=True)
        asyncio.run(bench.setup(base, data_dir, args.threads, targets))
        pg = EmbeddedPostgres(data_dir)
        running = pg.running()
        assert running is not None
        owner = running.dsn(owner=True, database="bedside")
        asyncio.run(_sql(owner, "ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'"))
    finally:
        _stop(service)
    EmbeddedPostgres(data_dir).stop()  # the library loads only at server start

    service = _serve(env)
    try:
        pg = EmbeddedPostgres(data_dir)
        running = pg.running()
        assert running is not None
        owner = running.dsn(owner=True, database="bedside")
        bench.POSTMASTER.append(int((pg.pgdata / "postmaster.pid").read_text().split()[0]))
        asyncio.run(_sql(owner, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements"))
        asyncio.run(_sql(owner, "ALTER SYSTEM SET pg_stat_statements.track_planning = on"))
        asyncio.run(_sql(owner, "SELECT pg_reload_conf()"))
        read_targets = work / "read-targets.txt"
        bench.top_up(base, owner, targets, read_targets, threads=min(50, args.threads))
        for name, template, aims in (("send", bench.LUA_SEND, targets), ("read of 50", bench.LUA_READ, read_targets)):
            script = work / f"{name.split()[0]}.lua"
            script.write_text(template % {"targets": aims, "body": bench.BODY})
            asyncio.run(_sql(owner, "SELECT pg_stat_statements_reset()"))
            run = bench.wrk(base, script, args.concurrency, args.seconds, service.pid, owner)
            requests = run["rps"] * args.seconds
            service_ms, postgres_ms = (1000 * run[k] / run["rps"] for k in ("cpu_service", "cpu_postgres"))
            print(
                f"\n{name} at c={args.concurrency}: {run['rps']:.0f} req/s; per request, ms of CPU: service "
                f"{service_ms:.2f}, PostgreSQL {postgres_ms:.2f}"
            )
            print(f"{'calls':>7} {'plans':>7} {'plan us/req':>11} {'exec us/req':>11}  statement")
            for row in asyncio.run(_sql(owner, _TOP, args.top)):
                plan, execute = (1000 * row[k] / requests for k in ("total_plan_time", "total_exec_time"))
                print(f"{row['calls']:>7} {row['plans']:>7} {plan:>11.1f} {execute:>11.1f}  {row['query']}")
    finally:
        _stop(service)
    print(f"\ndata: {work}")


if __name__ == "__main__":
    main()
