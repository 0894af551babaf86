"""The README's first command, for real: `bedside serve` with no database URL starts its own
PostgreSQL, serves, lets other commands join it, refuses a second serve, and stops cleanly on Ctrl-C.
"""

from __future__ import annotations

import asyncio
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
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import asyncpg
import pytest

from service.cli import EMBEDDED_DATABASE, CliError, _check_embedded_connections, _reuse_or_restart, database_target
from service.embedded import EmbeddedPostgres, data_dir_holder
from service.errors import ConfigurationError
from service.settings import Settings
from service.store.bootstrap import ensure_database
from service.store.migrate import load_migrations, migrate
from tests.conftest import Cluster
from tests.support import TestIssuer, alive, frozen, postmaster_pid, server_processes, wait_until, watchdogs

BEDSIDE = str(Path(sys.executable).parent / "bedside")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def data_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="bedside-e2e-"))
    os.chmod(path, 0o711)
    yield path
    EmbeddedPostgres(path).stop()
    shutil.rmtree(path, ignore_errors=True)


def _env(data_dir: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEDSIDE_")}
    env.update(BEDSIDE_DATA_DIR=str(data_dir), BEDSIDE_PORT=str(port), BEDSIDE_LOG_FORMAT="json")
    return env


def _start(env: dict[str, str], stderr: IO[str] | int = subprocess.DEVNULL) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen([BEDSIDE, "serve"], env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if "curl" in line:
            return proc, lines
    proc.kill()
    proc.wait()
    proc.stdout.close()
    pytest.fail(f"bedside serve did not come up: {lines}")


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BEDSIDE, *args], env=env, capture_output=True, text=True, timeout=120, check=False)


def _me(port: int, token: str) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/me", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _stop(proc: subprocess.Popen[str]) -> int:
    """Ctrl-C, and its exit status; killed (and the test failed) if it has not stopped within 60 s. One
    that has ended already is only waited for. Either way its pipes are closed."""
    proc.send_signal(signal.SIGINT)  # nothing, if it has ended
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail("bedside serve did not stop within 60 s of Ctrl-C")
    finally:
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.mark.slow
def test_serve_runs_embedded_postgres_is_reused_and_stops_cleanly(data_dir: Path) -> None:
    port = _free_port()
    env = _env(data_dir, port)
    pg = EmbeddedPostgres(data_dir)

    proc, welcome = _start(env)
    try:
        # It tells a newcomer how to get a token and one curl that works.
        assert any(f"http://127.0.0.1:{port}" in line for line in welcome)
        assert any("token --tenant demo --role patient --sub Patient/1" in line for line in welcome)

        token = _cli(env, "token", "--tenant", "demo", "--role", "patient", "--sub", "Patient/1")
        assert token.returncode == 0, token.stderr
        assert token.stdout.count("\n") == 1  # just the token
        assert _me(port, token.stdout.strip()) == (
            200,
            {
                "tenant": "demo",
                "subject": "Patient/1",
                "role": "patient",
                "issuer": "urn:bedside:dev-issuer",
                "act_for": None,
            },
        )

        # Other commands join the running cluster instead of starting another.
        created = _cli(env, "tenant", "create", "acme")
        assert created.returncode == 0, created.stderr
        assert "created tenant acme" in created.stdout

        # A second serve on the same data directory is refused, clearly.
        second = _cli(env | {"BEDSIDE_PORT": str(_free_port())}, "serve")
        assert second.returncode == 1
        assert "in use by `bedside serve`" in second.stderr
    finally:
        assert _stop(proc) == 0
    assert pg.running_port() is None, "Ctrl-C must stop the embedded PostgreSQL too"

    # The next run reuses the data directory: what was created before is still there.
    version_file = pg.pgdata / "PG_VERSION"
    initialized_at = version_file.stat().st_mtime_ns
    proc, _ = _start(env)
    try:
        acme = _cli(env, "token", "--tenant", "acme", "--role", "physician", "--sub", "Practitioner/5").stdout.strip()
        status, body = _me(port, acme)
        assert status == 200
        assert body["tenant"] == "acme"
    finally:
        assert _stop(proc) == 0
    assert version_file.stat().st_mtime_ns == initialized_at, "the cluster must not be re-initialized"
    assert pg.running_port() is None


def test_commands_start_and_stop_the_embedded_database_when_no_serve_runs(data_dir: Path) -> None:
    env = _env(data_dir, _free_port())
    created = _cli(env, "tenant", "create", "clinic-1")
    assert created.returncode == 0, created.stderr
    listed = _cli(env, "tenant", "list")
    assert listed.returncode == 0, listed.stderr
    assert {line.split("\t")[0] for line in listed.stdout.splitlines()} == {"clinic-1", "demo"}
    assert EmbeddedPostgres(data_dir).running_port() is None


def test_token_refuses_to_mint_outside_embedded_mode(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEDSIDE_")}
    env.update(BEDSIDE_DATABASE_URL="postgresql://nobody@127.0.0.1:1/none", BEDSIDE_DATA_DIR=str(tmp_path))
    result = _cli(env, "token", "--role", "patient", "--sub", "Patient/1")
    assert result.returncode == 1
    assert "only in embedded mode" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("command", [["serve"], ["tenant", "list"]], ids=["serve", "tenant-list"])
def test_more_connections_than_the_embedded_database_takes_are_refused_before_it_starts(
    data_dir: Path, command: list[str]
) -> None:
    """The largest pools in the most processes the settings allow: 64 x (500 + 1) connections. Every command
    that would start the embedded PostgreSQL sizes it for `serve`, so each refuses them the same way."""
    env = _env(data_dir, _free_port()) | {"BEDSIDE_PROCESSES": "64", "BEDSIDE_DB_POOL_MAX": "500"}

    result = _cli(env, *command)

    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "bedside: BEDSIDE_PROCESSES=64 with BEDSIDE_DB_POOL_MAX=500 may open 32064 database connections (in each "
        "process its pool, and one for the audit sequencer where it runs), but the embedded PostgreSQL takes at "
        "most 3975: lower either setting, or set BEDSIDE_DATABASE_URL to a PostgreSQL server sized for them"
    ]
    assert list(data_dir.iterdir()) == []  # nothing initialized, nothing started


def test_the_embedded_connection_bound_admits_up_to_3975_connections(tmp_path: Path) -> None:
    def wanting(processes: int, pool: int) -> Settings:
        return Settings(data_dir=tmp_path, processes=processes, db_pool_min=1, db_pool_max=pool, audit_sequencer=True)

    _check_embedded_connections(wanting(25, 158))  # 25 x 159 = 3975: PostgreSQL gets max_connections=4000
    with pytest.raises(ConfigurationError, match="may open 3976 database connections"):
        _check_embedded_connections(wanting(8, 496))  # 8 x 497


def _connection_slots(pg: EmbeddedPostgres) -> int:
    """How many connections the running embedded PostgreSQL accepts from the service's role."""
    running = pg.running()
    assert running is not None

    async def query() -> int:
        conn = await asyncpg.connect(running.dsn(owner=True, database="postgres"))
        try:
            slots: int = await conn.fetchval(
                "SELECT current_setting('max_connections')::int"
                " - current_setting('superuser_reserved_connections')::int"
            )
            return slots
        finally:
            await conn.close()

    return asyncio.run(query())


@pytest.mark.slow
def test_several_server_processes_share_the_port_and_stop_together(data_dir: Path, tmp_path: Path) -> None:
    port = _free_port()
    # Pools of up to 120: with the sequencers' own connections 2 x 121, more than PostgreSQL's usual 200.
    # A TMPDIR of the test's own: a parent killed outright (below) leaves its servers' metrics directory.
    temp = tmp_path / "temp"
    temp.mkdir()
    env = _env(data_dir, port) | {"BEDSIDE_PROCESSES": "2", "BEDSIDE_DB_POOL_MAX": "120", "TMPDIR": str(temp)}
    pg = EmbeddedPostgres(data_dir)
    token = ""

    # Ctrl-C stops every server process, then the database, and the command succeeds.
    proc, _ = _start(env)
    try:
        servers = server_processes(proc.pid)
        assert len(servers) == 2
        # The embedded PostgreSQL was started with room for every connection the servers may open.
        assert _connection_slots(pg) >= 2 * 121
        token = _cli(env, "token", "--tenant", "demo", "--role", "patient", "--sub", "Patient/1").stdout.strip()
        # Each one serves the shared port: with either one frozen, the other still answers.
        for server in servers:
            with frozen(server):
                assert [_me(port, token)[0] for _ in range(3)] == [200, 200, 200]
        assert len(watchdogs(data_dir)) == 1
    finally:
        assert _stop(proc) == 0
    assert all(not Path(f"/proc/{pid}").exists() for pid in servers)
    assert pg.running_port() is None
    assert watchdogs(data_dir) == []

    # A server process that dies takes the command down with it, so that a supervisor restarts the
    # whole: the other one is stopped, then the database, and the exit status says it failed.
    with (tmp_path / "stderr.txt").open("w+") as stderr:
        proc, _ = _start(env, stderr)
        try:
            servers = server_processes(proc.pid)
            assert len(servers) == 2
            assert _me(port, token)[0] == 200
            os.kill(servers[0], signal.SIGKILL)
            assert proc.wait(timeout=60) == 1
        finally:
            _stop(proc)  # it has ended, unless something above failed
        stderr.seek(0)
        assert re.search(
            r"server process bedside-serve-\d was killed by SIGKILL; the others were stopped", stderr.read()
        )
    assert not Path(f"/proc/{servers[1]}").exists()
    assert pg.running_port() is None

    # A parent killed outright (SIGKILL, the OOM killer) leaves no server serving on unwatched, and its
    # PostgreSQL is stopped too, even when whatever read their logs is gone (a closed terminal): their
    # next log line fails to write, as does the watchdog's.
    proc, _ = _start(env, subprocess.PIPE)
    servers = []
    try:
        servers = server_processes(proc.pid)
        assert len(servers) == 2
        assert proc.stderr is not None
        proc.stderr.close()
        proc.kill()
        proc.wait()
        assert wait_until(lambda: not any(alive(pid) for pid in servers), 30)
    finally:
        try:
            _stop(proc)  # killed above, unless something failed first
        finally:
            _kill_survivors(servers)
    assert wait_until(lambda: pg.running_port() is None and not watchdogs(data_dir), 30)


def _wait_for_postmaster_to_end(pid: int, data_dir: Path) -> None:
    """The embedded PostgreSQL (`pid`, its postmaster) and its watchdog end within 30 s."""
    assert wait_until(lambda: not alive(pid), 30), "the embedded PostgreSQL outlived the serve that owned it"
    assert wait_until(lambda: not watchdogs(data_dir), 10)


def test_a_killed_serve_takes_its_embedded_postgres_with_it(data_dir: Path, tmp_path: Path) -> None:
    env = _env(data_dir, _free_port())
    pg = EmbeddedPostgres(data_dir)
    with (tmp_path / "stderr.txt").open("w+") as stderr:
        proc, _ = _start(env, stderr)
        try:
            postmaster = postmaster_pid(pg.pgdata)
            assert len(watchdogs(data_dir)) == 1
            proc.kill()  # SIGKILL: serve has no chance to stop anything
            proc.wait()
            _wait_for_postmaster_to_end(postmaster, data_dir)
        finally:
            _stop(proc)  # killed above, unless something failed first
        stderr.seek(0)
        assert f"bedside: stopped the embedded PostgreSQL in {pg.pgdata}: the process that ran it (pid {proc.pid})" in (
            stderr.read()
        )
    # Stopped cleanly, and only stopped: the data stays for the next run.
    assert pg.initialized
    assert "database system is shut down" in pg.logfile.read_text().splitlines()[-1]


def test_a_killed_serve_with_several_processes_takes_its_embedded_postgres_with_it(data_dir: Path) -> None:
    """Even while a server process of it cannot end (frozen): none of them keeps the watchdog waiting."""
    env = _env(data_dir, _free_port()) | {"BEDSIDE_PROCESSES": "2"}
    pg = EmbeddedPostgres(data_dir)
    proc, _ = _start(env)
    servers = []
    try:
        servers = server_processes(proc.pid)
        assert len(servers) == 2
        postmaster = postmaster_pid(pg.pgdata)
        with frozen(servers[0]):
            proc.kill()
            proc.wait()
            _wait_for_postmaster_to_end(postmaster, data_dir)
            assert alive(servers[0])
    finally:
        try:
            _stop(proc)  # killed above, unless something failed first
        finally:
            _kill_survivors(servers)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_serve_stopped_normally_stops_its_postgres_and_leaves_no_watchdog(data_dir: Path, signum: int) -> None:
    env = _env(data_dir, _free_port())
    pg = EmbeddedPostgres(data_dir)
    proc, _ = _start(env)
    try:
        watchdog = watchdogs(data_dir)
        assert len(watchdog) == 1
        postmaster = postmaster_pid(pg.pgdata)
        proc.send_signal(signum)
        assert proc.wait(timeout=60) == 0
    finally:
        _stop(proc)
    assert not alive(postmaster)
    assert not alive(watchdog[0])
    assert watchdogs(data_dir) == []


def test_a_serve_that_reuses_a_cluster_left_running_stops_it_when_killed(data_dir: Path) -> None:
    """A cluster left running with no watchdog (an earlier serve killed along with its watchdog, or one
    from before watchdogs): the serve that reuses it owns it, killed or not."""
    left = EmbeddedPostgres(data_dir)
    left.start()
    try:
        for pid in watchdogs(data_dir):
            os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: not watchdogs(data_dir), 10)
        postmaster = postmaster_pid(left.pgdata)

        proc, _ = _start(_env(data_dir, _free_port()))
        try:
            assert postmaster_pid(left.pgdata) == postmaster  # reused, not restarted
            assert len(watchdogs(data_dir)) == 1
            proc.kill()
            proc.wait()
            _wait_for_postmaster_to_end(postmaster, data_dir)
        finally:
            _stop(proc)
    finally:
        left.stop()


async def test_a_cluster_left_running_is_reused_if_big_enough_and_never_stopped_under_its_users(
    cluster: Cluster,
) -> None:
    """What `serve` does with an embedded PostgreSQL an earlier run left running (here the suite's own
    cluster, 197 slots, which must survive the test): reuse it when it has room; when it has not and
    someone still uses it, refuse and leave it running."""
    pg = EmbeddedPostgres(cluster.data_dir)
    running = pg.running()
    assert running is not None
    assert await asyncio.to_thread(_reuse_or_restart, pg, running, 100) == running

    user = await asyncpg.connect(cluster.owner_dsn("postgres"))  # another client, as a joined command is
    try:
        with pytest.raises(CliError, match=r"accepts 197 connections, this run needs 1000, and \d+ other"):
            await asyncio.to_thread(_reuse_or_restart, pg, running, 1000)
        assert await user.fetchval("SELECT 1") == 1  # never stopped under it
    finally:
        await user.close()
    assert pg.running() == running


def _kill_survivors(pids: list[int]) -> None:
    """SIGKILL those of `pids` still running: server processes whose parent is gone, which a failed test
    must not leave serving."""
    for pid in pids:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def _at_0015_with_one_key_under_two_names(owner_dsn: str, maintenance_dsn: str) -> None:
    """An embedded database as the version before migration 0016 could leave it: one portal key trusted
    under two kids (the same PEM added twice), which that version allowed."""
    await ensure_database(maintenance_dsn, EMBEDDED_DATABASE)
    conn = await asyncpg.connect(owner_dsn)
    try:
        await migrate(conn, load_migrations()[:15])
        tenant = await conn.fetchval("INSERT INTO tenants (slug) VALUES ('acme') RETURNING id")
        issuer = await conn.fetchval(
            "INSERT INTO issuers (tenant_id, issuer, roles, registered_by) "
            "VALUES ($1, 'https://portal.acme.test', '{patient}', 'operator') RETURNING id",
            tenant,
        )
        pem = TestIssuer(tenant="acme", issuer="https://portal.acme.test").public_pem.decode()
        for kid in ("portal-key-1", "portal-key-1-again"):
            await conn.execute(
                "INSERT INTO issuer_keys (tenant_id, issuer_id, kid, algorithm, public_key_pem) "
                "VALUES ($1, $2, $3, 'EdDSA', $4)",
                tenant,
                issuer,
                kid,
                pem,
            )
    finally:
        await conn.close()


@pytest.mark.slow
def test_an_embedded_database_that_0016_refuses_can_run_the_revoke_the_refusal_asks_for(data_dir: Path) -> None:
    """Migration 0016 refuses a database holding one key under two names and tells the operator to run
    `bedside issuer revoke` of this version, then `bedside migrate`. In embedded mode every command migrates
    first, so that revoke must not be refused by the very migration it is meant to unblock; other commands
    (`migrate` here) still stop on the refusal."""
    pg = EmbeddedPostgres(data_dir)
    started = pg.start()
    try:
        asyncio.run(
            _at_0015_with_one_key_under_two_names(
                started.dsn(owner=True, database=EMBEDDED_DATABASE), started.dsn(owner=True, database="postgres")
            )
        )
    finally:
        pg.stop()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEDSIDE_")} | {"BEDSIDE_DATA_DIR": str(data_dir)}
    refused = _cli(env, "migrate")
    assert refused.returncode == 1
    assert "Revoke each of these keys with `bedside issuer revoke" in refused.stderr

    revoke = ("issuer", "revoke", "--tenant", "acme", "--issuer", "https://portal.acme.test", "--kid", "portal-key-1")
    revoked = _cli(env, *revoke)

    assert revoked.returncode == 0, revoked.stderr
    # It says what it is doing: the refusal, and that it goes on without the migration for this repair.
    assert "bedside: warning: migration 0016_one_name_per_issuer_key refused to run" in revoked.stderr
    assert "going on without it, for the repair it asks for" in revoked.stderr
    assert "revoked the same key under kid=portal-key-1-again of issuer https://portal.acme.test too" in (
        revoked.stdout
    )
    migrated = _cli(env, "migrate")
    assert migrated.returncode == 0, migrated.stderr


async def _in_one_transaction(dsn: str, between: Callable[[], None]) -> int:
    """A joined command's work: a transaction that spans `between` (run in a thread), then commits."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            before = int(await conn.fetchval("SELECT count(*) FROM tenants"))
            await asyncio.to_thread(between)
            return before + int(await conn.fetchval("SELECT count(*) FROM tenants"))
    finally:
        await conn.close()


def test_a_killed_serves_watchdog_does_not_stop_postgres_under_a_command_that_joined_it(data_dir: Path) -> None:
    """A command run while `serve` holds the data directory joins its PostgreSQL without the directory's
    lock. If `serve` is then killed, its watchdog must wait for that command (as `_reuse_or_restart` does
    for the users of a cluster left running) rather than abort its transaction with a fast shutdown; it
    stops the server once the command is done."""
    pg = EmbeddedPostgres(data_dir)
    proc, _ = _start(_env(data_dir, _free_port()))
    try:
        postmaster = postmaster_pid(pg.pgdata)
        joined = Settings(data_dir=data_dir, database_url=None)  # the command's own settings: no URL

        def serve_killed_meanwhile() -> None:
            proc.kill()  # SIGKILL: the watchdog takes over
            proc.wait()
            assert not wait_until(lambda: not alive(postmaster), 5), "stopped under the joined command"

        with database_target(joined, "issuer") as target:
            assert asyncio.run(_in_one_transaction(target.app_dsn, serve_killed_meanwhile)) == 2  # demo, twice
        _wait_for_postmaster_to_end(postmaster, data_dir)  # and once it is done, the watchdog stops it
    finally:
        _stop(proc)


def test_a_serve_restarted_after_a_kill_is_not_held_off_by_a_command_that_joined_the_killed_one(
    data_dir: Path,
) -> None:
    """The killed serve's watchdog waits for the commands that joined its PostgreSQL before stopping it. It
    must not hold the data directory while it waits: a joined command may run for long (`audit verify` of a
    large log, one stopped with Ctrl-Z), and meanwhile the serve restarted after the kill (by systemd, by
    the operator) is refused as "in use by `bedside watchdog`" after 90 s, as is every other command."""
    env = _env(data_dir, _free_port())
    pg = EmbeddedPostgres(data_dir)
    proc, _ = _start(env)
    again: subprocess.Popen[str] | None = None
    try:
        postmaster = postmaster_pid(pg.pgdata)
        joined = Settings(data_dir=data_dir, database_url=None)  # the command's own settings: no URL
        with database_target(joined, "issuer"):
            proc.kill()  # SIGKILL: the watchdog takes over, and waits for this command
            proc.wait()
            wait_until(lambda: data_dir_holder(data_dir) == "watchdog", 10)  # where it waits, if it holds it
            again, _ = _start(_env(data_dir, _free_port()))
            assert data_dir_holder(data_dir) == "serve"
            assert len(watchdogs(data_dir)) == 2  # the killed serve's, and the restarted one's
        # The command is done: the killed serve's watchdog lets the server be, which the restarted serve
        # reused (and watches itself).
        assert wait_until(lambda: len(watchdogs(data_dir)) == 1, 10)
        assert alive(postmaster)
        assert _stop(again) == 0
        _wait_for_postmaster_to_end(postmaster, data_dir)
    finally:
        if again is not None:
            _stop(again)
        _stop(proc)


def test_a_serve_stopped_normally_does_not_stop_postgres_under_a_command_that_joined_it(data_dir: Path) -> None:
    """As its watchdog does when it is killed: a `serve` stopped with Ctrl-C (or systemd's SIGTERM) waits for
    the commands that joined its PostgreSQL (they hold `bedside.users.lock` shared) before its fast shutdown,
    which would otherwise abort their transactions; it stops the server once they are done."""
    pg = EmbeddedPostgres(data_dir)
    proc, _ = _start(_env(data_dir, _free_port()))
    try:
        postmaster = postmaster_pid(pg.pgdata)
        joined = Settings(data_dir=data_dir, database_url=None)  # the command's own settings: no URL

        def serve_stopped_meanwhile() -> None:
            proc.send_signal(signal.SIGINT)
            assert not wait_until(lambda: not alive(postmaster), 5), "stopped under the joined command"

        with database_target(joined, "issuer") as target:
            assert asyncio.run(_in_one_transaction(target.app_dsn, serve_stopped_meanwhile)) == 2  # demo, twice
        assert _stop(proc) == 0
        _wait_for_postmaster_to_end(postmaster, data_dir)
    finally:
        _stop(proc)


def test_a_serve_stopped_normally_waits_for_a_joined_command_no_longer_than_its_shutdown_timeout(
    data_dir: Path, tmp_path: Path
) -> None:
    """The wait for the commands that joined its PostgreSQL is bounded by BEDSIDE_SHUTDOWN_TIMEOUT_SECONDS: one
    that outlives it (stopped with Ctrl-Z, say) does not keep `serve` from stopping, nor the server from
    being stopped; `serve` says so."""
    pg = EmbeddedPostgres(data_dir)
    with (tmp_path / "stderr.txt").open("w+") as stderr:
        proc, _ = _start(_env(data_dir, _free_port()) | {"BEDSIDE_SHUTDOWN_TIMEOUT_SECONDS": "2"}, stderr)
        try:
            postmaster = postmaster_pid(pg.pgdata)
            joined = Settings(data_dir=data_dir, database_url=None)  # the command's own settings: no URL
            with database_target(joined, "issuer"):
                began = time.monotonic()
                assert _stop(proc) == 0
                assert time.monotonic() - began >= 2  # it did wait for the command
                _wait_for_postmaster_to_end(postmaster, data_dir)  # and stopped the server under it
        finally:
            _stop(proc)
        stderr.seek(0)
        said = stderr.read()
    assert (
        "commands that joined the embedded PostgreSQL still run after 2 s (BEDSIDE_SHUTDOWN_TIMEOUT_SECONDS); "
        "stopping it anyway: their open transactions are rolled back"
    ) in said


def test_a_serve_stopped_normally_that_nothing_joined_does_not_wait_for_its_shutdown_timeout(data_dir: Path) -> None:
    """Only a command that joined is waited for: with none, Ctrl-C stops `serve` and its server at once, not
    after BEDSIDE_SHUTDOWN_TIMEOUT_SECONDS (`_stop` fails the test after 60 s)."""
    pg = EmbeddedPostgres(data_dir)
    proc, _ = _start(_env(data_dir, _free_port()) | {"BEDSIDE_SHUTDOWN_TIMEOUT_SECONDS": "300"})
    try:
        postmaster = postmaster_pid(pg.pgdata)
        began = time.monotonic()
        assert _stop(proc) == 0
        assert time.monotonic() - began < 30
        _wait_for_postmaster_to_end(postmaster, data_dir)
    finally:
        _stop(proc)
