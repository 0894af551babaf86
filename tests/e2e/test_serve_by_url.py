"""`bedside serve` and `bedside worker` on an existing database (the suite's cluster, so no PostgreSQL of
their own to start): what serve checks before serving, in one process and in several; what the
background work records; a worker that does that work without HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from crypto.checkpoint import Ed25519CheckpointSigner
from crypto.kek_file import LocalKeyFileProvider
from service.settings import Settings
from tests.api.messaging_helpers import consent, thread
from tests.api.webhook_helpers import Receiver, register
from tests.conftest import Dsns, Portals
from tests.support import audit_events, frozen, server_processes

BEDSIDE = str(Path(sys.executable).parent / "bedside")


def _env(kek_file: Path, signing_key_file: Path, **variables: str) -> dict[str, str]:
    """The operator's keys, provisioned beforehand when missing (outside embedded mode Bedside never
    invents them), and `variables` as BEDSIDE_<NAME>."""
    if not kek_file.exists():
        LocalKeyFileProvider(kek_file, create=True)
    if not signing_key_file.exists():
        Ed25519CheckpointSigner.generate("bedside.localhost/audit").save(signing_key_file)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEDSIDE_")}
    env |= {"BEDSIDE_KEK_FILE": str(kek_file), "BEDSIDE_AUDIT_SIGNING_KEY_FILE": str(signing_key_file)}
    env |= {f"BEDSIDE_{name.upper()}": value for name, value in variables.items()}
    return env


def test_serve_refuses_more_connections_than_the_database_accepts(
    database: Dsns, kek_file: Path, signing_key_file: Path
) -> None:
    # The suite's cluster takes 200 connections, 3 of them kept for superusers: 197 for the service.
    env = _env(kek_file, signing_key_file, processes="2", db_pool_max="150", port="0")

    result = subprocess.run(
        [BEDSIDE, "serve", "--database-url", database.app], env=env, capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 1
    assert result.stdout == ""  # it never said it was serving
    assert result.stderr.splitlines() == [
        "bedside: BEDSIDE_PROCESSES=2 with BEDSIDE_DB_POOL_MAX=150 may open 302 database connections (in each "
        "process its pool, and one for the audit sequencer where it runs), but the database accepts 197 "
        "(max_connections less its reserved slots): lower either setting, or raise the server's max_connections"
    ]


@pytest.mark.parametrize("limited", ["role", "database"])
async def test_serve_counts_a_role_or_database_connection_limit_too(
    database: Dsns, kek_file: Path, signing_key_file: Path, limited: str
) -> None:
    """A CONNECTION LIMIT on the login role or on the database binds before max_connections does: `serve`
    names it, rather than meet "too many connections for role" under load."""
    owner = await asyncpg.connect(database.owner)
    role = f"bedside_limited_{uuid.uuid4().hex[:12]}"
    dsn = database.app
    try:
        if limited == "role":
            await owner.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'limited' CONNECTION LIMIT 30 IN ROLE bedside_app")
            dsn = urlunsplit(urlsplit(database.app)._replace(netloc=f"{role}:limited@"))
        else:
            await owner.execute(f'ALTER DATABASE "{database.name}" CONNECTION LIMIT 30')
        env = _env(kek_file, signing_key_file, processes="2", db_pool_max="20", port="0")

        result = await asyncio.to_thread(
            subprocess.run,
            [BEDSIDE, "serve", "--database-url", dsn],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

        which = "the login role's" if limited == "role" else "the database's"
        assert result.returncode == 1
        assert result.stdout == ""
        assert result.stderr.splitlines() == [
            "bedside: BEDSIDE_PROCESSES=2 with BEDSIDE_DB_POOL_MAX=20 may open 42 database connections (in each "
            f"process its pool, and one for the audit sequencer where it runs), but the database accepts 30 "
            f"({which} CONNECTION LIMIT): lower either setting, or raise {which} CONNECTION LIMIT"
        ]
    finally:
        try:
            if limited == "role":
                await owner.execute(f"DROP ROLE IF EXISTS {role}")
        finally:
            await owner.close()


@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_server_that_cannot_start_says_why_in_one_line(
    empty_database: Dsns, kek_file: Path, signing_key_file: Path, processes: str, tmp_path: Path
) -> None:
    # A database nobody migrated: serve itself connects to it, then each server process refuses it.
    temp = tmp_path / "temp"  # serve's TMPDIR: whatever it leaves there, the test sees
    temp.mkdir()
    env = _env(kek_file, signing_key_file, processes=processes, port="0") | {"TMPDIR": str(temp)}

    result = subprocess.run(
        [BEDSIDE, "serve", "--database-url", empty_database.app], env=env, capture_output=True, text=True, timeout=60
    )

    # As one process says it: one line, no traceback, exit status 1.
    assert result.returncode == 1
    assert result.stdout == ""
    [said] = result.stderr.splitlines()
    assert re.fullmatch(r"bedside: the database schema is at migration 0 of \d+: run `bedside migrate` first", said)
    assert list(temp.iterdir()) == []  # the servers' shared metrics directory is gone too


@pytest.mark.parametrize("processes", ["1", "2"])
async def test_port_zero_serves_on_a_free_port_and_says_which(
    database: Dsns, kek_file: Path, signing_key_file: Path, processes: str, tmp_path: Path
) -> None:
    env = _env(kek_file, signing_key_file, processes=processes, port="0")
    async with _running(["serve", "--database-url", database.app], env, tmp_path) as serve:
        port = _serving_port(await serve.first_line())
        assert port != 0
        ready = await asyncio.to_thread(urllib.request.urlopen, f"http://127.0.0.1:{port}/readyz", timeout=10)
        with ready:
            assert ready.status == 200
    assert serve.returncode == 0, serve.stderr()


async def test_every_scrape_counts_the_requests_of_every_server_process(
    database: Dsns, kek_file: Path, signing_key_file: Path, tmp_path: Path
) -> None:
    """With several server processes a scrape of /metrics reaches one of them, whichever the kernel hands
    the connection to; each reports what all of them served. Each is frozen in turn (SIGSTOP), so that the
    other takes every new connection: both serve requests, and both answer scrapes. The files the counts
    are shared through go in a private directory that is gone once serve stops."""
    temp = tmp_path / "temp"  # serve's TMPDIR: whatever it leaves there, the test sees
    temp.mkdir()
    env = _env(kek_file, signing_key_file, processes="2", port="0") | {"TMPDIR": str(temp)}
    scrapes: list[str] = []
    async with _running(["serve", "--database-url", database.app], env, tmp_path) as serve:
        port = _serving_port(await serve.first_line())
        servers = server_processes(serve.process.pid)
        assert len(servers) == 2
        for server in servers:
            with frozen(server):
                for _ in range(3):
                    assert await asyncio.to_thread(_get, port, "/healthz") == 200
        for server in servers:
            with frozen(server):
                for _ in range(2):
                    scrapes.append(await asyncio.to_thread(_scrape, port))
        # Exactly the six health checks, and the scrapes before this one (each is counted once answered;
        # a route nothing has requested yet has no sample at all).
        for earlier, scrape in enumerate(scrapes):
            requests, durations = {("/healthz", "200"): 6.0}, {"/healthz": 6.0}
            if earlier:
                requests[("/metrics", "200")] = durations["/metrics"] = earlier
            assert (_requests_counted(scrape), _durations_counted(scrape)) == (requests, durations), scrape

        [shared] = temp.iterdir()
        assert shared.stat().st_mode & 0o777 == 0o700
        # Files named by metric type and process id, holding route templates, methods and statuses only.
        assert {path.name for path in shared.iterdir()} == {
            f"{kind}_{pid}.db" for kind in ("counter", "histogram") for pid in servers
        }
    assert serve.returncode == 0, serve.stderr()
    assert list(temp.iterdir()) == []


async def test_every_server_process_finds_the_client_behind_a_trusted_proxy(
    database: Dsns, kek_file: Path, signing_key_file: Path, tmp_path: Path
) -> None:
    """BEDSIDE_TRUSTED_PROXIES reaches each spawned server process: with loopback trusted, a refused token
    is audited under the client X-Forwarded-For names, whichever process answers (each frozen in turn)."""
    env = _env(kek_file, signing_key_file, processes="2", port="0", trusted_proxies="127.0.0.1/32")
    async with _running(["serve", "--database-url", database.app], env, tmp_path) as serve:
        port = _serving_port(await serve.first_line())
        servers = server_processes(serve.process.pid)
        assert len(servers) == 2
        for number, server in enumerate(servers, start=1):
            with frozen(server):
                status = await asyncio.to_thread(_refused_token, port, f"198.51.100.{number}")
                assert status == 401
    assert serve.returncode == 0, serve.stderr()
    sources = {row["source"] for row in await audit_events(database.owner, "action = 'auth:denied'")}
    assert sources == {"198.51.100.1", "198.51.100.2"}


def _refused_token(port: int, forwarded_for: str) -> int:
    """GET /v1/me with a token nobody issued, as a proxy forwarding for `forwarded_for`: the status."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/me",
        headers={"Authorization": "Bearer not.a.token", "X-Forwarded-For": f"192.0.2.9, {forwarded_for}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status: int = response.status
    except urllib.error.HTTPError as refused:
        status = refused.code
    return status


def _serving_port(banner: str) -> int:
    """The port in what `serve` prints once it listens."""
    found = re.search(r"serving on http://127\.0\.0\.1:(\d+)$", banner)
    assert found, banner
    return int(found.group(1))


def _get(port: int, path: str) -> int:
    """GET `path` over a connection of its own (urllib closes each): its status."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        status: int = response.status
        return status


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text: str = response.read().decode()
        return text


def _requests_counted(scrape: str) -> dict[tuple[str, str], float]:
    """`bedside_http_requests_total` of the GET requests in `scrape`, by route and status."""
    return {
        (sample.labels["route"], sample.labels["status"]): sample.value
        for family in text_string_to_metric_families(scrape)
        for sample in family.samples
        if sample.name == "bedside_http_requests_total" and sample.labels["method"] == "GET"
    }


def _durations_counted(scrape: str) -> dict[str, float]:
    """How many GET requests the latency histogram in `scrape` has observed, by route."""
    return {
        sample.labels["route"]: sample.value
        for family in text_string_to_metric_families(scrape)
        for sample in family.samples
        if sample.name == "bedside_http_request_duration_seconds_count" and sample.labels["method"] == "GET"
    }


@dataclass
class _Command:
    """A `bedside` command running under a test: its first line of output, its stderr (kept in a file,
    so a chatty process never blocks on a full pipe) and, once stopped, its exit status."""

    process: asyncio.subprocess.Process
    stderr_file: Path
    returncode: int | None = None

    async def first_line(self, within: float = 60) -> str:
        assert self.process.stdout is not None
        line = (await asyncio.wait_for(self.process.stdout.readline(), within)).decode()
        assert line, f"it ended before saying anything: {self.stderr()}"
        return line

    def stderr(self) -> str:
        return self.stderr_file.read_text(errors="replace")[-3000:]

    def alive(self) -> None:
        """Fail now, with its stderr, if it has ended."""
        assert self.process.returncode is None, f"it ended with status {self.process.returncode}: {self.stderr()}"


@contextlib.asynccontextmanager
async def _running(
    args: list[str], env: dict[str, str], tmp_path: Path, stop: int = signal.SIGINT
) -> AsyncIterator[_Command]:
    """Run `bedside *args`; on the way out send it `stop` and wait for it (killed after 60 s), whatever
    the test did meanwhile."""
    stderr_file = tmp_path / f"{args[0]}-{uuid.uuid4().hex[:8]}.stderr"
    with stderr_file.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(BEDSIDE, *args, env=env, stdout=subprocess.PIPE, stderr=stderr)
    command = _Command(process, stderr_file)
    try:
        yield command
    finally:
        if process.returncode is None:
            process.send_signal(stop)
        try:
            command.returncode = await asyncio.wait_for(process.wait(), 60)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise AssertionError(f"`bedside {args[0]}` did not stop within 60 s: {command.stderr()}") from None


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The app that arranges a test delivers no webhooks itself: the `bedside serve` under test does."""
    return settings.model_copy(update={"webhook_worker": False, "webhook_allow_http_loopback": True})


async def _two_deliveries_waiting(client: Any, portals: Portals, receiver: Receiver) -> None:
    """An endpoint for the receiver and a new thread with a message: thread.created and message.created
    wait for a delivery (the app that arranges them delivers none itself)."""
    await register(client, portals, receiver.url)
    await consent(client, portals)
    await thread(client, portals, message="first")


@pytest.mark.parametrize("processes", ["1", "2"])
async def test_background_work_is_audited_under_the_serve_run_in_every_process_count(
    client: Any,
    portals: Portals,
    receiver: Receiver,
    database: Dsns,
    kek_file: Path,
    signing_key_file: Path,
    processes: str,
    tmp_path: Path,
) -> None:
    """What the servers' background tasks record (here the webhook worker's deliveries) carries the
    request id and source of the `bedside serve` run that did it, whether one process serves or several."""
    await _two_deliveries_waiting(client, portals, receiver)
    env = _env(
        kek_file,
        signing_key_file,
        processes=processes,
        port="0",
        webhook_allow_http_loopback="true",
        webhook_poll_interval_seconds="0.05",
    )
    async with _running(["serve", "--database-url", database.app], env, tmp_path) as serve:
        await serve.first_line()
        recorded = await _deliveries_audited(database, serve, count=2, within=60)
    assert serve.returncode == 0, serve.stderr()

    assert {row["source"] for row in recorded} == {"cli"}
    [run] = {row["request_id"] for row in recorded}  # one id for the run, whichever process delivered
    assert re.fullmatch(r"cli-[0-9a-f]{32}", run)


async def test_a_worker_delivers_webhooks_without_serving_http(
    client: Any,
    portals: Portals,
    receiver: Receiver,
    database: Dsns,
    kek_file: Path,
    signing_key_file: Path,
    tmp_path: Path,
) -> None:
    """`bedside worker`: the background work of `serve` (here the webhook deliveries) with no HTTP API,
    for deployments that keep them apart; it stops cleanly on SIGTERM."""
    await _two_deliveries_waiting(client, portals, receiver)
    env = _env(kek_file, signing_key_file, webhook_allow_http_loopback="true", webhook_poll_interval_seconds="0.05")
    async with _running(["worker", "--database-url", database.app], env, tmp_path, stop=signal.SIGTERM) as worker:
        banner = await worker.first_line()
        recorded = await _deliveries_audited(database, worker, count=2, within=60)
        listening = _listening_ports(worker.process.pid)
    assert worker.returncode == 0, worker.stderr()
    assert re.fullmatch(
        r"Bedside \S+ worker is running: webhook deliveries, audit sequencer, idempotency purge \(no HTTP\)\n", banner
    )
    assert sorted(r.json["type"] for r in receiver.received) == ["message.created", "thread.created"]
    assert {row["source"] for row in recorded} == {"cli"}
    assert listening == set()


def _listening_ports(pid: int) -> set[int]:
    """The TCP ports `pid` listens on: its sockets' inodes, found in /proc/net/tcp{,6} in state LISTEN."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = ""
        with contextlib.suppress(FileNotFoundError):  # closed since the listing
            target = os.readlink(fd)
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_a_worker_needs_a_database_url(tmp_path: Path) -> None:
    """In embedded mode `serve` owns its cluster and does this work itself: a worker would hold the data
    directory against it, or lose its database when that serve stops."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEDSIDE_")} | {"BEDSIDE_DATA_DIR": str(tmp_path)}

    result = subprocess.run([BEDSIDE, "worker"], env=env, capture_output=True, text=True, timeout=60)

    assert result.returncode == 1
    assert result.stderr.startswith("bedside: `bedside worker` needs BEDSIDE_DATABASE_URL"), result.stderr
    assert list(tmp_path.iterdir()) == []  # no cluster started


def test_a_worker_with_nothing_to_do_says_so(database: Dsns, kek_file: Path, signing_key_file: Path) -> None:
    env = _env(
        kek_file,
        signing_key_file,
        webhook_worker="false",
        audit_sequencer="false",
        idempotency_purge_interval_seconds="0",
    )

    result = subprocess.run(
        [BEDSIDE, "worker", "--database-url", database.app], env=env, capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 1
    assert result.stderr.startswith("bedside: nothing to run: BEDSIDE_WEBHOOK_WORKER=false"), result.stderr


async def _deliveries_audited(database: Dsns, command: _Command, *, count: int, within: float) -> list[Any]:
    """The `webhook:deliver` audit events, once there are `count` of them; fails after `within` seconds,
    or as soon as `command` (which delivers them) has ended."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        recorded = await audit_events(database.owner, "action = 'webhook:deliver'")
        if len(recorded) >= count:
            return recorded
        command.alive()
        assert asyncio.get_running_loop().time() < deadline, f"{len(recorded)} of {count} deliveries audited"
        await asyncio.sleep(0.1)
