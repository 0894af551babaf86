"""The messaging benchmark: full sends and reads through `bedside serve` against a bare ceiling.

    apt-get install -y wrk && .venv/bin/pip install -e '.[bench]'
    .venv/bin/python tests/perf/bench_messaging.py [--seconds 20] [--threads 1000] [--explain-rows 2000000]
        [--concurrency 1,16,64]

It starts `bedside serve` in embedded mode (its own PostgreSQL, synchronous_commit on, fsync on) in a
temporary data directory, creates 1,000 patients each with a messaging consent and a thread, and drives it
with wrk and a Lua script from this machine's loopback:

- sends of 1 KiB messages to random threads at concurrency 1, 16 and 64 (auth, policy, consent, a new
  `Idempotency-Key` claimed with its response, seal, sequence, message, webhook outbox, audit: everything a
  real send does; `--no-idempotency-keys` leaves the key out, for comparison);
- reads of the latest 50 messages of a random one of 100 threads at concurrency 64 (each topped up to
  50 messages first, so every read returns a full page);
- in the same run, the ceiling: a bare aiohttp + asyncpg endpoint doing just the two INSERTs (a message
  row and an audit row) in one transaction, on the same PostgreSQL, at the same concurrencies.

Before the timed runs it counts the statements (each one a round trip) of a send and of a read from
PostgreSQL's statement log: a deterministic figure on a noisy machine. For each run it reports requests/s,
p50 and p99 (from wrk), non-2xx answers, and the CPU share of the service, PostgreSQL and wrk (from
/proc). During the c=64 send and read runs it samples the service with py-spy and prints where the time
goes, including the share spent sealing and opening. Finally it grows the messages table to millions of
rows and prints EXPLAIN (ANALYZE) of "the latest 50 of a thread".
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BEDSIDE = str(Path(sys.executable).parent / "bedside")
PY_SPY = str(Path(sys.executable).parent / "py-spy")
BODY = "x" * 1000  # with the JSON around it, a 1 KiB message


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the bare ceiling --------------------------------------------------------------------------------------


def run_bare_server(dsn: str, port: int, processes: int = 1) -> None:
    """A bare aiohttp + asyncpg endpoint: two INSERTs in one transaction, nothing else. With `processes`
    above 1, that many of it on one listening socket, as `bedside serve` runs with BEDSIDE_PROCESSES."""
    import multiprocessing

    if processes == 1:
        _bare_process(dsn, socket.create_server(("127.0.0.1", port), backlog=1024))
        return
    sock = socket.create_server(("127.0.0.1", port), backlog=1024)
    context = multiprocessing.get_context("spawn")
    children = [context.Process(target=_bare_process, args=(dsn, sock)) for _ in range(processes)]
    for child in children:
        child.start()
    stop = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # after the start: the children must not inherit it
    try:
        signal.sigwait(stop)
    finally:
        for child in children:
            child.terminate()
            child.join()


_INSERT_MESSAGE = "INSERT INTO bench_messages (id, body) VALUES ($1, $2)"
_INSERT_AUDIT = "INSERT INTO bench_audit (id, entry) VALUES ($1, $2)"
_BOTH_IN_ONE_STATEMENT = (
    "WITH m AS (INSERT INTO bench_messages (id, body) VALUES ($1, $2)) "
    "INSERT INTO bench_audit (id, entry) VALUES ($3, $4)"
)


def _bare_process(dsn: str, sock: socket.socket, round_trips: int = 4) -> None:
    """The bare endpoint. `round_trips`: 4 is the ceiling (BEGIN, the two INSERTs, COMMIT); 2 sends the
    INSERTs each in an implicit transaction; 1 sends both in one statement (`bench_round_trips.py`)."""
    import uuid

    import asyncpg
    from aiohttp import web

    async def init(app: web.Application) -> Any:
        app["pool"] = await asyncpg.create_pool(dsn, min_size=20, max_size=20)
        yield
        await app["pool"].close()

    async def post(request: web.Request) -> web.Response:
        body = await request.read()
        message_id, audit_id = uuid.uuid4(), uuid.uuid4()
        async with request.app["pool"].acquire() as conn:
            if round_trips == 4:
                async with conn.transaction():
                    await conn.execute(_INSERT_MESSAGE, message_id, body)
                    await conn.execute(_INSERT_AUDIT, audit_id, b"x" * 400)
            elif round_trips == 2:
                await conn.execute(_INSERT_MESSAGE, message_id, body)
                await conn.execute(_INSERT_AUDIT, audit_id, b"x" * 400)
            else:
                await conn.execute(_BOTH_IN_ONE_STATEMENT, message_id, body, audit_id, b"x" * 400)
        return web.json_response({"id": str(message_id)}, status=201)

    app = web.Application()
    app.cleanup_ctx.append(init)
    app.router.add_post("/bare", post)
    web.run_app(app, sock=sock, print=None, access_log=None)


# -- helpers -------------------------------------------------------------------------------------------


def cpu_by_pid(pids: list[int]) -> dict[int, float]:
    ticks = os.sysconf("SC_CLK_TCK")
    found = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            found[pid] = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
        except (OSError, IndexError):
            continue
    return found


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (the server processes of a multi-process run)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                found += [int(child), *descendants(int(child))]
    return found


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds between two readings: processes that ended meanwhile (an autovacuum worker, say) are
    left out rather than subtracted, processes that started count whole."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


POSTMASTER: list[int] = []  # this run's PostgreSQL (other clusters on the machine are not ours to count)


def postgres_pids() -> list[int]:
    if not POSTMASTER:
        return []
    out = subprocess.run(["pgrep", "-P", str(POSTMASTER[0])], capture_output=True, text=True, check=False).stdout
    return [POSTMASTER[0], *(int(p) for p in out.split())]


def postgres_kind(pid: int) -> str:
    """What a PostgreSQL process is, from its title: a backend (`postgres: user db ...`) or a helper."""
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "gone"
    for kind in ("walwriter", "checkpointer", "background writer", "autovacuum", "logical replication"):
        if kind in title:
            return kind
    return "backends" if title.startswith("postgres: ") else "postmaster"


def wal_stats(dsn: str | None) -> tuple[int, int]:
    """(WAL bytes, full-page images) written so far by the whole cluster (pg_stat_wal)."""
    if dsn is None:
        return 0, 0

    async def read() -> tuple[int, int]:
        import asyncpg

        conn = await asyncpg.connect(dsn)
        try:
            row = await conn.fetchrow("SELECT wal_bytes::bigint AS bytes, wal_fpi FROM pg_stat_wal")
        finally:
            await conn.close()
        assert row is not None
        return int(row["bytes"]), int(row["wal_fpi"])

    return asyncio.run(read())


def wrk(
    url: str, script: Path, connections: int, seconds: int, service_pid: int, stats_dsn: str | None = None
) -> dict[str, Any]:
    threads = min(2, connections)
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url]
    pg, svc = postgres_pids(), [service_pid, *descendants(service_pid)]
    wal_before = wal_stats(stats_dsn)
    before = (cpu_by_pid(svc), cpu_by_pid(pg))
    started = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate()
    wall = time.monotonic() - started
    wrk_cpu = sum(os.times()[2:4])  # children's user + system time so far (wrk is the only busy child)
    pids_after = postgres_pids()
    after = (cpu_by_pid(svc), cpu_by_pid(pids_after))
    wal_after = wal_stats(stats_dsn)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    requests = max(rps * wall, 1.0)
    by_kind: dict[str, float] = collections.defaultdict(float)
    for pid, cpu in after[1].items():
        by_kind[postgres_kind(pid)] += cpu - before[1].get(pid, 0.0)

    def pct(label: str) -> float:
        match = re.search(rf"\s{label}%\s+([\d.]+)(us|ms|s)", out)
        assert match, out
        value, unit = float(match.group(1)), match.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p50_ms": pct("50"),
        "p99_ms": pct("99"),
        "errors": int(non2xx.group(1)) if non2xx else 0,
        "cpu_service": cpu_used(before[0], after[0]) / wall,
        "cpu_postgres": cpu_used(before[1], after[1]) / wall,
        "wrk_cpu_total": wrk_cpu,
        "pg_ms_per_request_by_kind": {k: round(1000 * v / requests, 3) for k, v in sorted(by_kind.items())},
        "wal_bytes_per_request": round((wal_after[0] - wal_before[0]) / requests),
        "wal_fpi_per_request": round((wal_after[1] - wal_before[1]) / requests, 3),
    }


LUA_SEND = """
local lines = {}
for line in io.lines("%(targets)s") do
  local id, token = line:match("(%%S+) (%%S+)")
  lines[#lines + 1] = {id, token}
end
local body = '{"body":"%(body)s"}'
-- An Idempotency-Key on every send, as a portal that retries sends them: unique to this run, this wrk
-- thread (numbered by setup) and this request, so that none is a replay.
local keyed = %(keyed)s
local sent = 0
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
request = function()
  local t = lines[math.random(#lines)]
  local headers = {["Authorization"] = "Bearer " .. t[2], ["Content-Type"] = "application/json"}
  if keyed then
    sent = sent + 1
    headers["Idempotency-Key"] = "%(run)s-" .. tostring(tid) .. "-" .. sent
  end
  return wrk.format("POST", "/v1/threads/" .. t[1] .. "/messages", headers, body)
end
"""
LUA_READ = """
local lines = {}
for line in io.lines("%(targets)s") do
  local id, token = line:match("(%%S+) (%%S+)")
  lines[#lines + 1] = {id, token}
end
request = function()
  local t = lines[math.random(#lines)]
  return wrk.format("GET", "/v1/threads/" .. t[1] .. "/messages?limit=50", {["Authorization"] = "Bearer " .. t[2]})
end
"""
LUA_BARE = """
local body = '{"body":"%(body)s"}'
request = function()
  return wrk.format("POST", "/bare", {["Content-Type"] = "application/json"}, body)
end
"""


async def setup(base: str, data_dir: Path, count: int, targets: Path) -> None:
    """`count` patients, each with a messaging consent to Practitioner/1 and a thread with one message."""
    import aiohttp

    sys.path.insert(0, str(ROOT))
    from crypto.issuer_keys import issuer_key_pair_from_private_pem
    from service.domain.issuers import DEV_ISSUER, mint_token

    pair = issuer_key_pair_from_private_pem(await asyncio.to_thread((data_dir / "dev-issuer.pem").read_bytes))
    lines: list[str] = []
    semaphore = asyncio.Semaphore(16)

    async def one(session: aiohttp.ClientSession, n: int) -> None:
        token = mint_token(
            pair,
            issuer=DEV_ISSUER,
            audience="bedside",
            tenant="demo",
            role="patient",
            subject=f"Patient/{n}",
            lifetime_seconds=3600,
        )
        headers = {"Authorization": f"Bearer {token}"}
        async with semaphore:
            consent = {
                "patient": f"Patient/{n}",
                "grantee": "Practitioner/1",
                "scope": "messaging",
                "evidence": {"method": "portal", "text_version": "bench"},
            }
            async with session.post(f"{base}/v1/consents", json=consent, headers=headers) as response:
                assert response.status == 201, await response.text()
            thread = {
                "patient": f"Patient/{n}",
                "participants": ["Practitioner/1"],
                "subject": "bench",
                "message": {"body": BODY},
            }
            async with session.post(f"{base}/v1/threads", json=thread, headers=headers) as response:
                assert response.status == 201, await response.text()
                lines.append(f"{(await response.json())['id']} {token}")

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(one(session, n) for n in range(1, count + 1)))
    await asyncio.to_thread(targets.write_text, "\n".join(lines) + "\n")


def top_up(base: str, owner_dsn: str, targets: Path, read_targets: Path, threads: int, messages: int = 50) -> None:
    """Give the first `threads` threads at least `messages` messages each and make them the read targets,
    so every "latest 50" read returns a full page however long the send runs were."""
    import aiohttp
    import asyncpg

    lines = targets.read_text().split("\n")[:threads]

    async def run() -> None:
        conn = await asyncpg.connect(owner_dsn)
        try:
            ids = [line.split()[0] for line in lines]
            rows = await conn.fetch("SELECT id::text, last_seq FROM threads WHERE id = ANY($1::uuid[])", ids)
        finally:
            await conn.close()
        have = {r["id"]: r["last_seq"] for r in rows}
        semaphore = asyncio.Semaphore(16)

        async def send(session: aiohttp.ClientSession, thread_id: str, token: str) -> None:
            async with (
                semaphore,
                session.post(
                    f"{base}/v1/threads/{thread_id}/messages",
                    json={"body": BODY},
                    headers={"Authorization": f"Bearer {token}"},
                ) as response,
            ):
                assert response.status == 201, await response.text()

        async with aiohttp.ClientSession() as session:
            jobs = []
            for line in lines:
                thread_id, token = line.split()
                jobs += [send(session, thread_id, token) for _ in range(messages - have[thread_id])]
            await asyncio.gather(*jobs)

    asyncio.run(run())
    read_targets.write_text("\n".join(lines) + "\n")


def profile(pid: int, seconds: int, out: Path) -> subprocess.Popen[bytes] | None:
    if not Path(PY_SPY).exists():
        print("(py-spy not installed: pip install -e '.[bench]')")
        return None
    return subprocess.Popen(
        [
            PY_SPY,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(seconds),
            "--rate",
            "97",
            "--format",
            "raw",
            "--output",
            str(out),
            "--nonblocking",
            "--subprocesses",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def summarize_profile(path: Path, run: str) -> None:
    """Where the service's time goes: share of samples per component, and the crypto share."""
    if not path.exists():
        return
    components = collections.Counter()
    leaves = collections.Counter()
    inclusive = collections.Counter()  # Bedside's own functions, with everything they call
    total = 0
    rules = [
        (
            "sealing/opening (crypto/, cryptography)",
            ("crypto/envelope", "crypto/_format", "crypto/keys", "cryptography/"),
        ),
        ("JWT verification (PyJWT)", ("jwt/",)),
        ("asyncpg (protocol, codecs)", ("asyncpg/",)),
        ("pydantic (parsing, serializing)", ("pydantic",)),
        ("structlog + logging", ("structlog/", "logging/")),
        ("prometheus metrics", ("prometheus_client/",)),
        ("aiohttp (HTTP, routing, middleware)", ("aiohttp/",)),
        ("service/ (Bedside's own code)", ("service/",)),
        ("asyncio event loop", ("asyncio/",)),
    ]
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        leaves[frames[-1][:110]] += n
        for frame in set(frames):
            if "service/" in frame or "crypto/" in frame or "schemas/" in frame:
                inclusive[frame[:110]] += n
        for label, needles in rules:  # attribute the sample to the innermost matching component
            if any(needle in frame for frame in frames[-6:] for needle in needles):
                components[label] += n
                break
        else:
            components["other"] += n
    if not total:
        return
    print(f"\nwhere the time goes (py-spy, {total} samples during the c=64 {run} run; innermost match):")
    for label, n in components.most_common():
        print(f"  {100 * n / total:5.1f}%  {label}")
    print("  top frames:")
    for frame, n in leaves.most_common(20):
        print(f"  {100 * n / total:5.1f}%  {frame}")
    print("  Bedside's own functions, inclusive of what they call:")
    for frame, n in inclusive.most_common(25):
        print(f"  {100 * n / total:5.1f}%  {frame}")


_LOG_ENTRY = re.compile(r"^\S+ \S+ \S+ \[(\d+)\] (\w+):  (.*)$")


def count_round_trips(owner_dsn: str, logfile: Path, base: str, targets: Path, requests: int = 20) -> dict[str, float]:
    """Statements per send and per read of 50, from PostgreSQL's statement log: a deterministic measure,
    unlike timings on a shared machine. Each statement the service sends (asyncpg's cached prepared
    statements, the BEGIN + tenant batch, COMMIT) is one round trip."""
    import asyncpg

    async def set_logging(value: str | None) -> None:
        conn = await asyncpg.connect(owner_dsn)
        try:
            if value is None:
                await conn.execute("ALTER SYSTEM RESET log_statement")
            else:
                await conn.execute(f"ALTER SYSTEM SET log_statement = '{value}'")
            await conn.execute("SELECT pg_reload_conf()")
        finally:
            await conn.close()
        await asyncio.sleep(1)

    async def traffic() -> None:
        import aiohttp

        thread_id, token = (await asyncio.to_thread(targets.read_text)).split("\n")[0].split()
        headers = {"Authorization": f"Bearer {token}"}
        url = f"{base}/v1/threads/{thread_id}/messages"
        async with aiohttp.ClientSession() as session:
            for _ in range(requests):
                keyed = {**headers, "Idempotency-Key": uuid.uuid4().hex}
                async with session.post(url, json={"body": BODY}, headers=keyed) as response:
                    assert response.status == 201, await response.text()
                async with session.get(url, params={"limit": "50"}, headers=headers) as response:
                    assert response.status == 200, await response.text()

    async def run() -> int:
        await traffic()  # first, so that every pooled connection has prepared its statements
        await set_logging("all")
        offset = (await asyncio.to_thread(logfile.stat)).st_size
        try:
            await traffic()
        finally:
            await set_logging(None)
        return offset

    offset = asyncio.run(run())
    with logfile.open("rb") as handle:
        handle.seek(offset)
        text = handle.read().decode(errors="replace")
    # Group each backend's entries into transactions; a tenant transaction of a send or a read is
    # recognized by its audit action (in the logged parameters of its audit insert).
    entries: dict[str, list[str]] = collections.defaultdict(list)
    for line in text.splitlines():
        match = _LOG_ENTRY.match(line)
        if match:
            pid, level, message = match.groups()
            entries[pid].append(f"{level}: {message}")
            last = pid
        elif entries:
            entries[last][-1] += "\n" + line
    counts: dict[str, list[int]] = {"message:send": [], "message:read": []}
    for lines in entries.values():
        current: list[str] = []
        for entry in lines:
            if entry.startswith("LOG: statement: BEGIN"):
                current = [entry]
                continue
            if current:
                current.append(entry)
            if entry.startswith("LOG: statement: COMMIT") and current:
                # asyncpg's type introspection (with JIT turned off around it) runs once per connection,
                # the first time it meets a type (a fresh connection of a second server process, say),
                # not per request.
                statements = sum(
                    1 for e in current if e.startswith("LOG: ") and "typeinfo" not in e and "'jit'" not in e
                )
                joined = "\n".join(current)
                for action in counts:
                    if action in joined and "set_config('bedside.tenant_id'" in current[0]:
                        counts[action].append(statements)
                current = []
    result = {}
    for action, found in counts.items():
        result[action] = sum(found) / len(found) if found else float("nan")
        print(f"round trips per {action.split(':')[1]}: {result[action]:.1f} (over {len(found)} transactions)")
    return result


def explain(owner_dsn: str, rows: int) -> None:
    """Grow messages to `rows` and show that the latest 50 of a thread is an index range scan."""
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(owner_dsn)
        try:
            threads = await conn.fetch("SELECT id, tenant_id FROM threads ORDER BY id")
            per_thread = max(1, rows // len(threads))
            print(f"\ngrowing messages by {per_thread * len(threads):,} rows for EXPLAIN ...", flush=True)
            await conn.execute(
                """
                INSERT INTO messages (tenant_id, thread_id, seq, id, sender, sender_role, body)
                SELECT t.tenant_id, t.id, 1000 + g, gen_random_uuid(), 'Practitioner/1', 'physician',
                       '\\x00'::bytea
                FROM threads t, generate_series(1, $1) AS g
                """,
                per_thread,
            )
            await conn.execute("UPDATE threads SET last_seq = last_seq + 1000 + $1", per_thread)
            await conn.execute("ANALYZE messages")
            total = await conn.fetchval("SELECT count(*) FROM messages")
            # The service's own statement for a read of the latest 50 (thread, teams, key and page).
            from service.store.messaging import MessagingStore

            plan = await conn.fetch(
                "EXPLAIN (ANALYZE, BUFFERS) " + MessagingStore._READ_FACTS,
                threads[0]["tenant_id"],
                threads[0]["id"],
                None,
                None,
                2**62,
                50,
            )
            print(f"EXPLAIN of the latest 50 of one thread (MessagingStore._READ_FACTS), messages = {total:,} rows:")
            for line in plan:
                print("  " + line[0])
        finally:
            await conn.close()

    asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1000)
    parser.add_argument("--explain-rows", type=int, default=2_000_000, help="0: no EXPLAIN")
    parser.add_argument("--concurrency", default="1,16,64", help="send and bare runs (reads run at 64)")
    parser.add_argument("--no-profile", dest="profile", action="store_false", help="no py-spy sampling")
    parser.add_argument(
        "--no-idempotency-keys",
        dest="idempotency_keys",
        action="store_false",
        help="sends without an Idempotency-Key (portals send one; this is for comparison)",
    )
    parser.add_argument(
        "--service-env", action="append", default=[], metavar="NAME=VALUE", help="a bedside serve setting (A/B)"
    )
    parser.add_argument(
        "--processes", type=int, default=1, help="server processes, of bedside serve and of the bare endpoint alike"
    )
    parser.add_argument("mode", nargs="?", default="run", choices=["run", "bare"])
    parser.add_argument("--dsn")
    parser.add_argument("--port", type=int)
    args = parser.parse_args()
    if args.mode == "bare":
        run_bare_server(args.dsn, args.port, args.processes)
        return
    if shutil.which("wrk") is None:
        sys.exit("wrk is required: apt-get install -y wrk")

    work = Path(tempfile.mkdtemp(prefix="bedside-bench-"))
    os.chmod(work, 0o711)
    data_dir, port = work / "data", free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEDSIDE_")}
    env.update(
        BEDSIDE_DATA_DIR=str(data_dir), BEDSIDE_PORT=str(port), BEDSIDE_LOG_FORMAT="json", BEDSIDE_DB_POOL_MAX="20"
    )
    env["BEDSIDE_PROCESSES"] = str(args.processes)
    env.update(item.split("=", 1) for item in args.service_env)
    service = subprocess.Popen(
        [BEDSIDE, "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    bare: subprocess.Popen[bytes] | None = None
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

        async def bare_tables() -> None:
            import asyncpg

            conn = await asyncpg.connect(owner_dsn)
            await conn.execute("CREATE TABLE IF NOT EXISTS bench_messages (id uuid PRIMARY KEY, body bytea)")
            await conn.execute("CREATE TABLE IF NOT EXISTS bench_audit (id uuid PRIMARY KEY, entry bytea)")
            await conn.close()

        asyncio.run(bare_tables())
        count_round_trips(owner_dsn, pg.logfile, base, targets)
        bare_port = free_port()
        bare_args = ["--dsn", owner_dsn, "--port", str(bare_port), "--processes", str(args.processes)]
        bare = subprocess.Popen([sys.executable, __file__, "bare", *bare_args])
        time.sleep(2)

        read_targets = work / "read-targets.txt"
        scripts = {}
        for name, template in (("send", LUA_SEND), ("read", LUA_READ), ("bare", LUA_BARE)):
            path = work / f"{name}.lua"
            path.write_text(
                template
                % {
                    "targets": read_targets if name == "read" else targets,
                    "body": BODY,
                    "keyed": "true" if args.idempotency_keys else "false",
                    "run": uuid.uuid4().hex[:12],
                }
            )
            scripts[name] = path

        results: list[tuple[str, int, dict[str, Any]]] = []
        for connections in sorted(int(c) for c in args.concurrency.split(",")):
            wanted = args.profile and connections == 64
            spy = profile(service.pid, args.seconds, work / "profile.txt") if wanted else None
            sent = wrk(base, scripts["send"], connections, args.seconds, service.pid, owner_dsn)
            results.append(("send", connections, sent))
            if spy is not None:
                spy.wait(timeout=args.seconds + 30)
            results.append(
                (
                    "bare",
                    connections,
                    wrk(
                        f"http://127.0.0.1:{bare_port}", scripts["bare"], connections, args.seconds, bare.pid, owner_dsn
                    ),
                )
            )
        top_up(base, owner_dsn, targets, read_targets, threads=100)
        spy = profile(service.pid, args.seconds, work / "profile-read.txt") if args.profile else None
        results.append(("read50", 64, wrk(base, scripts["read"], 64, args.seconds, service.pid, owner_dsn)))
        if spy is not None:
            spy.wait(timeout=args.seconds + 30)

        print(
            f"\n{'run':8} {'conc':>4} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8} "
            f"{'cpu svc':>8} {'cpu pg':>7} {'svc ms/req':>10} {'pg ms/req':>9}"
        )
        for name, connections, r in results:
            print(
                f"{name:8} {connections:>4} {r['rps']:>9.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
                f"{r['errors']:>8} {r['cpu_service']:>8.2f} {r['cpu_postgres']:>7.2f} "
                f"{1000 * r['cpu_service'] / r['rps']:>10.2f} {1000 * r['cpu_postgres'] / r['rps']:>9.2f}"
            )
        print("\nPostgreSQL per request: ms of CPU by process kind; WAL bytes and full-page images")
        for name, connections, r in results:
            kinds = "  ".join(f"{k} {v:.3f}" for k, v in r["pg_ms_per_request_by_kind"].items())
            wal = f"wal {r['wal_bytes_per_request']} B  fpi {r['wal_fpi_per_request']}"
            print(f"{name:8} {connections:>4}  {kinds}  {wal}")
        by = {(n, c): r for n, c, r in results}
        send64, bare64, read64 = by[("send", 64)], by[("bare", 64)], by[("read50", 64)]
        print(
            f"\nsend/bare at c=64: {send64['rps'] / bare64['rps']:.2f}   "
            f"read50/bare at c=64: {read64['rps'] / bare64['rps']:.2f}"
        )
        print(
            "(cpu columns: cores used on average by the service (or bare server) and by this run's PostgreSQL "
            "during the run, and their CPU time per request, which moves less than req/s when other work "
            "shares the machine; wrk uses the rest of the 2 cores)"
        )
        summarize_profile(work / "profile.txt", "send")
        summarize_profile(work / "profile-read.txt", "read of 50")
        if args.explain_rows:
            explain(owner_dsn, args.explain_rows)
        (work / "results.json").write_text(json.dumps([{"run": n, "conc": c, **r} for n, c, r in results]))
        print(f"\nraw results: {work / 'results.json'}")
    finally:
        if bare is not None:
            bare.send_signal(signal.SIGINT)
            bare.wait(timeout=30)
        service.send_signal(signal.SIGINT)
        service.wait(timeout=60)


if __name__ == "__main__":
    main()
