"""The webhook benchmark: deliveries per second to a local receiver, and the delay from commit to delivery.

    apt-get install -y wrk && .venv/bin/pip install -e '.[bench]'
    .venv/bin/python tests/perf/bench_webhooks.py [--seconds 20] [--threads 1000] [--rate 1000] [--backlog 20000]

It starts `bedside serve` in embedded mode (its own PostgreSQL, synchronous_commit and fsync on, the
delivery worker inside the service, http to loopback allowed) and a receiver (a bare aiohttp server in a
process of its own that answers 200 and writes down when each delivery arrived). Then:

1. **Offered load:** wrk sends 1 KiB messages to 1,000 threads, paced by a Lua `delay()` to about
   `--rate` messages/s, while the worker delivers one `message.created` per message to the receiver.
   It reports the sends accepted per second, the deliveries per second, and the delay from commit
   (the delivery's `timestamp`, the time of the sending transaction) to arrival: p50 and p99.
2. **Backlog drain:** the endpoint is disabled, `--backlog` messages are sent (their deliveries are
   held), the endpoint is enabled again, and the time until every held delivery has arrived gives the
   worker's own delivery rate, without sends competing for the CPU.

Every delivery is signed and consent-checked, as in production; the receiver verifies nothing (that
is the receiver's cost, not ours). CPU shares of the service, PostgreSQL and the receiver are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_messaging import (
    BEDSIDE,
    BODY,
    LUA_SEND,
    POSTMASTER,
    ROOT,
    cpu_by_pid,
    cpu_used,
    free_port,
    postgres_pids,
    setup,
    wrk,
)

PACED = (
    LUA_SEND
    + """
delay = function()
  return %(delay_ms)d
end
"""
)


def run_receiver(port: int, out: Path) -> None:
    """200 for every POST; one line per arrival: arrival time, the payload's timestamp, webhook-id."""
    from aiohttp import web

    lines: list[str] = []

    async def post(request: web.Request) -> web.Response:
        body = await request.read()
        arrived = time.time()
        stamp = json.loads(body)["timestamp"]
        lines.append(f"{arrived:.6f} {stamp} {request.headers['webhook-id']}\n")
        return web.Response(status=200)

    async def flush(_app: web.Application) -> None:
        await asyncio.to_thread(out.write_text, "".join(lines))  # run_app stops on SIGTERM, then cleans up

    app = web.Application()
    app.on_cleanup.append(flush)
    app.router.add_post("/hook", post)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def arrivals(path: Path) -> list[tuple[float, float, str]]:
    rows = []
    for line in path.read_text().splitlines():
        arrived, stamp, ident = line.split(" ")
        committed = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
        rows.append((float(arrived), committed, ident))
    return rows


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def admin(base: str, data_dir: Path, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    import aiohttp

    from crypto.issuer_keys import issuer_key_pair_from_private_pem
    from service.domain.issuers import DEV_ISSUER, mint_token

    pair = issuer_key_pair_from_private_pem((data_dir / "dev-issuer.pem").read_bytes())
    token = mint_token(
        pair,
        issuer=DEV_ISSUER,
        audience="bedside",
        tenant="demo",
        role="admin",
        subject="Practitioner/admin",
        lifetime_seconds=3600,
    )
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, base + path, json=body, headers={"Authorization": f"Bearer {token}"}) as response,
    ):
        assert response.status < 300, await response.text()
        return await response.json()


def delivered(owner_dsn: str) -> int:
    import asyncpg

    async def count() -> int:
        conn = await asyncpg.connect(owner_dsn)
        try:
            return int(await conn.fetchval("SELECT count(*) FROM webhook_outbox WHERE status = 'succeeded'"))
        finally:
            await conn.close()

    return asyncio.run(count())


def wait_delivered(owner_dsn: str, expected: int, timeout: float) -> float:
    started = time.monotonic()
    while delivered(owner_dsn) < expected:
        if time.monotonic() - started > timeout:
            raise SystemExit(f"only {delivered(owner_dsn)} of {expected} delivered after {timeout} s")
        time.sleep(0.2)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1000)
    parser.add_argument("--rate", type=int, default=1000, help="messages/s offered")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--backlog", type=int, default=20000)
    parser.add_argument("mode", nargs="?", default="run", choices=["run", "receiver"])
    parser.add_argument("--port", type=int)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.mode == "receiver":
        run_receiver(args.port, Path(args.out))
        return

    work = Path(tempfile.mkdtemp(prefix="bedside-bench-hooks-"))
    os.chmod(work, 0o711)
    data_dir, port, hook_port = work / "data", free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEDSIDE_")}
    env.update(
        BEDSIDE_DATA_DIR=str(data_dir),
        BEDSIDE_PORT=str(port),
        BEDSIDE_LOG_FORMAT="json",
        BEDSIDE_LOG_LEVEL="warning",
        BEDSIDE_DB_POOL_MAX="20",
        BEDSIDE_WEBHOOK_ALLOW_HTTP_LOOPBACK="true",
        BEDSIDE_WEBHOOK_CONCURRENCY="64",
        BEDSIDE_WEBHOOK_POLL_INTERVAL_SECONDS="0.05",
    )
    service = subprocess.Popen(
        [BEDSIDE, "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    out_file = work / "arrivals.txt"
    receiver = subprocess.Popen(
        [sys.executable, __file__, "receiver", "--port", str(hook_port), "--out", str(out_file)]
    )
    try:
        assert service.stdout is not None
        while "curl" not in service.stdout.readline():
            if service.poll() is not None:
                sys.exit("bedside serve did not start")
        base = f"http://127.0.0.1:{port}"
        targets = work / "targets.txt"
        print(f"setting up {args.threads} patients, consents and threads ...", flush=True)
        asyncio.run(setup(base, data_dir, args.threads, targets))
        sys.path.insert(0, str(ROOT))
        from service.embedded import EmbeddedPostgres

        pg = EmbeddedPostgres(data_dir)
        running = pg.running()
        assert running is not None
        owner_dsn = running.dsn(owner=True, database="bedside")
        POSTMASTER.append(int((pg.pgdata / "postmaster.pid").read_text().split()[0]))

        created = asyncio.run(
            admin(
                base,
                data_dir,
                "POST",
                "/v1/admin/webhook-endpoints",
                {
                    "subscriber": "Practitioner/1",
                    "url": f"http://127.0.0.1:{hook_port}/hook",
                    "event_types": ["message.created"],
                },
            )
        )
        endpoint = created["endpoint"]["id"]

        # 1. Offered load, paced.
        delay_ms = max(1, round(1000 * args.connections / args.rate))
        script = work / "paced.lua"
        script.write_text(PACED % {"targets": targets, "body": BODY, "delay_ms": delay_ms})
        processes = ([service.pid], postgres_pids(), [receiver.pid])
        before = [cpu_by_pid(pids) for pids in processes]
        started = time.monotonic()
        sent = wrk(base, script, args.connections, args.seconds, service.pid)
        accepted = round(sent["rps"] * args.seconds)
        drain = wait_delivered(owner_dsn, accepted, timeout=300)
        wall = time.monotonic() - started
        # PostgreSQL's backends now, not only the ones that were there at the start.
        processes = ([service.pid], postgres_pids(), [receiver.pid])
        used = [cpu_used(b, cpu_by_pid(pids)) for b, pids in zip(before, processes, strict=True)]

        # 2. Backlog drain: held while disabled, then released at once.
        asyncio.run(admin(base, data_dir, "POST", f"/v1/admin/webhook-endpoints/{endpoint}/disable"))
        backlog_script = work / "backlog.lua"
        backlog_script.write_text(LUA_SEND % {"targets": targets, "body": BODY})
        before_backlog = delivered(owner_dsn)
        count = 0
        while count < args.backlog:
            burst = wrk(base, backlog_script, 64, 5, service.pid)
            count += round(burst["rps"] * 5)
        time.sleep(2)  # the worker holds each one as it finds the endpoint disabled
        released = asyncio.run(admin(base, data_dir, "POST", f"/v1/admin/webhook-endpoints/{endpoint}/enable"))[
            "released"
        ]
        drained_in = wait_delivered(owner_dsn, before_backlog + released, timeout=600)
    finally:
        service.terminate()
        service.wait(timeout=60)
        receiver.terminate()
        receiver.wait(timeout=30)

    rows = arrivals(out_file)
    steady = rows[:accepted]
    delays = [1000 * (arrived - committed) for arrived, committed, _ in steady]
    span = max(a for a, _, _ in steady) - min(a for a, _, _ in steady)
    print(f"\noffered about {args.rate}/s for {args.seconds} s (wrk c={args.connections}, delay {delay_ms} ms):")
    print(f"  sends accepted: {sent['rps']:.0f}/s (send p50 {sent['p50_ms']:.1f} ms, p99 {sent['p99_ms']:.1f} ms)")
    print(f"  deliveries: {len(steady)} in {span:.1f} s = {len(steady) / span:.0f}/s; all done {drain:.1f} s after wrk")
    print(
        f"  commit to delivery: p50 {statistics.median(delays):.0f} ms, p99 {percentile(delays, 99):.0f} ms, "
        f"max {max(delays):.0f} ms"
    )
    print(f"  cpu (cores): service {used[0] / wall:.2f}, postgres {used[1] / wall:.2f}, receiver {used[2] / wall:.2f}")
    print(
        f"\nbacklog: {released} held deliveries released, all delivered in {drained_in:.1f} s = "
        f"{released / drained_in:.0f} deliveries/s"
    )
    ids = [ident for _, _, ident in rows]
    print(f"duplicates seen by the receiver: {len(ids) - len(set(ids))}")


if __name__ == "__main__":
    main()
