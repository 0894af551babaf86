"""What one round trip to PostgreSQL costs here: the bare endpoint's two INSERTs sent three ways.

    apt-get install -y wrk
    .venv/bin/python tests/perf/bench_round_trips.py [--seconds 8] [--rounds 2] [--concurrency 64]

`bench_messaging.py`'s ceiling sends BEGIN, two INSERTs and COMMIT: four round trips. This script starts
a durable PostgreSQL of its own (the embedded one, in a temporary directory, reached over its Unix
socket as `bedside serve` reaches it) and runs, interleaved, the same endpoint three ways:

- `4`: BEGIN, INSERT, INSERT, COMMIT (the ceiling of `bench_messaging.py`);
- `2`: the two INSERTs, each in its own implicit transaction (two commits);
- `1`: both INSERTs in one statement (a data-modifying CTE).

It prints req/s, p99 and the CPU time per request of the endpoint and of PostgreSQL. The difference
between `4` and `2`, halved, is what a BEGIN or COMMIT round trip costs: the most a send or a read could
save per round trip it drops.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_messaging as bench  # this directory is not a package


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the three variants")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("mode", nargs="?", default="run", choices=["run", "endpoint"])
    parser.add_argument("--dsn")
    parser.add_argument("--port", type=int)
    parser.add_argument("--variant", choices=["4", "2", "1"])
    args = parser.parse_args()
    if args.mode == "endpoint":
        bench._bare_process(args.dsn, socket.create_server(("127.0.0.1", args.port), backlog=1024), int(args.variant))
        return
    if shutil.which("wrk") is None:
        sys.exit("wrk is required: apt-get install -y wrk")

    sys.path.insert(0, str(bench.ROOT))
    import asyncpg

    from service.embedded import EmbeddedPostgres

    work = Path(tempfile.mkdtemp(prefix="bedside-rt-"))
    pg = EmbeddedPostgres(work / "data")
    try:
        dsn = pg.start(durable=True).dsn(owner=True, database="postgres")
        bench.POSTMASTER.append(int((pg.pgdata / "postmaster.pid").read_text().split()[0]))

        async def tables() -> None:
            conn = await asyncpg.connect(dsn)
            await conn.execute("CREATE TABLE bench_messages (id uuid PRIMARY KEY, body bytea)")
            await conn.execute("CREATE TABLE bench_audit (id uuid PRIMARY KEY, entry bytea)")
            await conn.close()

        asyncio.run(tables())
        script = work / "bare.lua"
        script.write_text(bench.LUA_BARE % {"body": bench.BODY})
        print(f"{'round trips':>11} {'req/s':>7} {'p99 ms':>7} {'svc ms/req':>10} {'pg ms/req':>9}", flush=True)
        for _ in range(args.rounds):
            for variant in ("4", "2", "1"):
                port = bench.free_port()
                endpoint = subprocess.Popen(
                    [sys.executable, __file__, "endpoint", "--dsn", dsn, "--port", str(port), "--variant", variant]
                )
                try:
                    time.sleep(2)
                    r = bench.wrk(f"http://127.0.0.1:{port}", script, args.concurrency, args.seconds, endpoint.pid, dsn)
                finally:
                    endpoint.terminate()
                    endpoint.wait(timeout=30)
                print(
                    f"{variant:>11} {r['rps']:>7.0f} {r['p99_ms']:>7.1f} "
                    f"{1000 * r['cpu_service'] / r['rps']:>10.3f} {1000 * r['cpu_postgres'] / r['rps']:>9.3f}",
                    flush=True,
                )
    finally:
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
