"""The `bedside` command: serve, migrate, tenant, issuer, token.

With no database URL, every command works against the embedded PostgreSQL in the data directory,
starting it when it is not running (and stopping it again afterwards if it started it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.context import SpawnProcess
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web
from pydantic import SecretStr

from crypto.checkpoint import format_vkey, parse_vkey
from crypto.dek_cache import DataKeyCache
from crypto.issuer_keys import IssuerKeyError, generate_ed25519_issuer_key, issuer_key_pair_from_private_pem
from service import __version__
from service.api.metrics import SHARED_DIR_VARIABLE
from service.api.server import app_runner
from service.app import build_audit_signer, build_kek_provider, close_provider, create_app
from service.domain.audit import REQUEST_META, AuditRecorder, RequestMeta
from service.domain.audit_verify import VerifyResult, verify_database, verify_export
from service.domain.issuers import DEV_ISSUER, IssuerService, mint_token
from service.domain.keyring import KekClient, PatientKeyring
from service.domain.keys import KeyOperations, KeyStatus
from service.domain.principal import SUBJECT_TYPE, Role, is_reference, parse_roles
from service.domain.tenants import TenantService
from service.embedded import (
    APP_LOGIN_ROLE,
    MAX_SERVICE_CONNECTIONS,
    EmbeddedError,
    EmbeddedPostgres,
    data_dir_holder,
    exclusive_data_dir,
    joined_data_dir,
    without_joined_users,
)
from service.embedded import (
    Connection as EmbeddedConnection,
)
from service.errors import ConfigurationError, DomainError, InvalidRequestError, RevokedKeyError
from service.logs import configure_logging, get_logger
from service.settings import Settings, SettingsError, load_settings
from service.store.audit import AuditStore
from service.store.bootstrap import ensure_database, migrate_database, prepare_database, schema_report
from service.store.data_keys import DataKeyStore
from service.store.db import Database, client_connections, connection_limit
from service.store.issuers import IssuerStore
from service.store.migrate import MigrationRefusedError
from service.store.tenants import TenantStore

T = TypeVar("T")
EMBEDDED_DATABASE = "bedside"
DEMO_TENANT = "demo"
DEV_KEY_FILE = "dev-issuer.pem"
log = get_logger("bedside.cli")


class CliError(Exception):
    """A message for the operator; exit status 1."""


# What a mistake in configuration or input raises: one `bedside: ...` line and exit status 1, no traceback.
_OPERATOR_ERRORS = (CliError, EmbeddedError, ConfigurationError, DomainError)


def _operator_message(exc: Exception) -> str:
    """What follows `bedside: ` for one of _OPERATOR_ERRORS."""
    if isinstance(exc, InvalidRequestError):
        details = "; ".join(f"{'.'.join(map(str, p.loc))}: {p.msg}" for p in exc.problems)
        return f"{exc.detail}: {details}"
    return str(exc)


# -- database resolution -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """Where a command's database is: the service's URL, and the owner's when Bedside manages it."""

    app_dsn: str
    owner_dsn: str | None
    embedded: bool


@contextlib.contextmanager
def database_target(settings: Settings, purpose: str, *, repair: bool = False) -> Iterator[Target]:
    """Resolve the database for one command. Embedded: start (or join) the private cluster and make
    sure it is migrated, has the service's login role, the `demo` tenant and the development issuer.
    `repair`: a command a refusing migration may ask the operator to run (the `issuer` commands, for 0016
    and 0017) goes on, with a warning, on the schema as the refusal left it; every other command stops."""
    if settings.database_url is not None:
        url = settings.database_url.get_secret_value()
        yield Target(app_dsn=url, owner_dsn=url, embedded=False)
        return
    pg = EmbeddedPostgres(settings.data_dir)
    if purpose != "serve" and data_dir_holder(settings.data_dir) == "serve":
        with joined_data_dir(settings.data_dir):  # a killed serve's watchdog waits for this command
            connection = pg.running()
            if connection is None:
                raise CliError("`bedside serve` holds the data directory but its database is not running")
            yield Target(connection.dsn(), connection.dsn(owner=True, database=EMBEDDED_DATABASE), True)
        return
    _check_embedded_connections(settings)
    with exclusive_data_dir(settings.data_dir, purpose):
        connection = pg.running()
        if connection is not None and purpose == "serve":
            connection = _reuse_or_restart(pg, connection, settings.serve_connections)
            if connection is not None:
                pg.watch()  # it is this serve's now, killed or not: see EmbeddedPostgres.watch
        started = connection is None
        if connection is None:
            print(f"Starting the embedded PostgreSQL in {pg.pgdata} ...", file=sys.stderr)
            connection = pg.start(connections=settings.serve_connections)
        try:
            target = Target(connection.dsn(), connection.dsn(owner=True, database=EMBEDDED_DATABASE), True)
            asyncio.run(
                _prepare_embedded(
                    settings,
                    connection.dsn(owner=True, database="postgres"),
                    target,
                    connection.app_password,
                    repair=repair,
                )
            )
            yield target
        finally:
            # `serve` holds the directory for its whole life, so it stops the cluster it served from.
            if purpose == "serve":
                _stop_after_joined_commands(pg, settings)
            elif started:
                print("Stopping the embedded PostgreSQL ...", file=sys.stderr)
                pg.stop()


def _stop_after_joined_commands(pg: EmbeddedPostgres, settings: Settings) -> None:
    """Stop the server `serve` served from, once the commands that joined it have ended (a fast stop would
    abort their transactions), as its watchdog would if it were killed; but not waiting for them longer
    than the shutdown timeout."""
    timeout = settings.shutdown_timeout_seconds
    print("Stopping the embedded PostgreSQL ...", file=sys.stderr)
    with without_joined_users(settings.data_dir, timeout=timeout) as alone:
        if not alone:
            print(
                f"bedside: commands that joined the embedded PostgreSQL still run after {timeout:g} s "
                "(BEDSIDE_SHUTDOWN_TIMEOUT_SECONDS); stopping it anyway: their open transactions are rolled back",
                file=sys.stderr,
            )
        pg.stop()


def _check_embedded_connections(settings: Settings) -> None:
    """Refuse, before anything starts, to size the embedded PostgreSQL past its bound (MAX_MAX_CONNECTIONS)
    for the connections `serve` may hold: asked for tens of thousands, PostgreSQL reserves memory for every
    slot, and where the host cannot give it, fails to start with no more to say than "see logfile"."""
    if settings.serve_connections > MAX_SERVICE_CONNECTIONS:
        raise ConfigurationError(
            f"{_connections_wanted(settings)}, but the embedded PostgreSQL takes at most {MAX_SERVICE_CONNECTIONS}: "
            "lower either setting, or set BEDSIDE_DATABASE_URL to a PostgreSQL server sized for them"
        )


def _connections_wanted(settings: Settings) -> str:
    """What the operator's settings make `serve` hold, in their words, for an error message."""
    return (
        f"BEDSIDE_PROCESSES={settings.processes} with BEDSIDE_DB_POOL_MAX={settings.db_pool_max} may open "
        f"{settings.serve_connections} database connections (in each process its pool, and one for the "
        "audit sequencer where it runs)"
    )


def _reuse_or_restart(pg: EmbeddedPostgres, connection: EmbeddedConnection, need: int) -> EmbeddedConnection | None:
    """A cluster left running (by a `serve` that was killed) is reused when it has room for `need`
    connections. Otherwise it is stopped, to start again sized for them, but only if nobody uses it:
    what a killed `serve` leaves behind (its server processes finishing their requests, commands that
    joined it) holds no lock on the data directory, and stopping would abort their transactions."""
    slots, others = _run(_cluster_use(connection.dsn(owner=True, database="postgres")))
    if slots >= need:
        return connection
    if others:
        raise CliError(
            f"the embedded PostgreSQL left running by an earlier run accepts {slots} connections, this run "
            f"needs {need}, and {others} other connection(s) still use it: stop them (or that run's server "
            "processes) and try again, or lower BEDSIDE_PROCESSES or BEDSIDE_DB_POOL_MAX"
        )
    print(
        "Restarting the embedded PostgreSQL left running by an earlier run, for more connections ...", file=sys.stderr
    )
    pg.stop()
    return None


async def _cluster_use(owner_dsn: str) -> tuple[int, int]:
    """The running cluster's connection slots, and how many client connections besides this one it has."""
    db = await Database.connect(owner_dsn, min_size=1, max_size=1)
    try:
        return (await connection_limit(db)).slots, await client_connections(db)
    finally:
        await db.close()


async def _prepare_embedded(
    settings: Settings, maintenance_dsn: str, target: Target, app_password: str, *, repair: bool
) -> None:
    assert target.owner_dsn is not None
    await ensure_database(maintenance_dsn, EMBEDDED_DATABASE)
    try:
        applied = await prepare_database(target.owner_dsn, APP_LOGIN_ROLE, app_password, login_if_refused=repair)
    except MigrationRefusedError as refused:
        if not repair:
            raise
        # Every embedded command migrates first: without this, the repair a refusal asks for would be refused
        # by the same migration. The issuer commands work on the schema before 0016 and 0017 (no column of
        # theirs is new there); a later refusing migration whose repair needs its own schema must not pass
        # `repair`.
        print(f"bedside: warning: {refused}", file=sys.stderr)
        print("bedside: warning: going on without it, for the repair it asks for", file=sys.stderr)
        return
    for migration in applied:
        log.info("migration.applied", migration=f"{migration.version:04d}_{migration.name}")
    async with _services(target.app_dsn, settings) as (tenants, issuers):
        await tenants.ensure(DEMO_TENANT)
        for tenant in await tenants.all():
            await _trust_dev_issuer(settings, issuers, tenant.slug)


def _dev_key_path(settings: Settings) -> Path:
    return settings.data_dir.resolve() / DEV_KEY_FILE


async def _trust_dev_issuer(settings: Settings, issuers: IssuerService, tenant: str) -> None:
    """Embedded mode only: the development issuer's key, made once, trusted by every tenant."""
    path = _dev_key_path(settings)
    if not path.exists():
        pair = generate_ed25519_issuer_key()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pair.private_pem)
    pair = issuer_key_pair_from_private_pem(path.read_bytes())
    # An operator who revoked it meant it: it stays revoked, and the server starts all the same.
    with contextlib.suppress(RevokedKeyError):
        await issuers.add_dev_key(tenant, pair.public.pem.encode())


@contextlib.asynccontextmanager
async def _services(dsn: str, settings: Settings) -> Any:
    db = await Database.connect(dsn, min_size=1, max_size=2)
    try:
        tenant_store, recorder = TenantStore(), AuditRecorder(AuditStore(), db)
        yield (
            TenantService(db, tenant_store, recorder),
            IssuerService(
                db, tenant_store, IssuerStore(), recorder, cache_seconds=0, admin_roles=settings.admin_issuer_roles
            ),
        )
    finally:
        await db.close()


def _run(coro: Awaitable[T]) -> T:
    async def wrapper() -> T:
        return await coro

    return asyncio.run(wrapper())


# -- commands -----------------------------------------------------------------------------------------


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    with database_target(settings, "serve") as target:
        effective = _effective(settings, target)
        _run(_check_connection_budget(effective))
        welcome = functools.partial(_print_welcome, settings, effective, target)
        if effective.processes == 1:
            _run_server(_serve(effective, welcome))
        else:
            _serve_processes(effective, welcome)
    return 0


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    """The background work of `serve` without its HTTP API, for deployments that keep the two apart:
    webhook deliveries, the audit sequencer and the idempotency purge, each as its setting says. Any
    number of workers and servers may share a database (leases, the sequencer's lock and SKIP LOCKED
    keep them apart). Not in embedded mode, whose one `serve` owns its cluster and does this work."""
    if settings.embedded:
        raise CliError(
            "`bedside worker` needs BEDSIDE_DATABASE_URL (or --database-url): in embedded mode `bedside serve` "
            "does this work itself"
        )
    running = _background_work(settings)
    if not running:
        raise CliError(
            "nothing to run: BEDSIDE_WEBHOOK_WORKER=false, BEDSIDE_AUDIT_SEQUENCER=false and "
            "BEDSIDE_IDEMPOTENCY_PURGE_INTERVAL_SECONDS=0 turn off everything a worker does"
        )
    with database_target(settings, "worker") as target:
        effective = _effective(settings, target).model_copy(update={"processes": 1})
        _run(_check_connection_budget(effective))

        def welcome(_: int) -> None:
            print(f"Bedside {__version__} worker is running: {', '.join(running)} (no HTTP)", flush=True)

        _run_server(_serve(effective, welcome, listen=False))
    return 0


def _background_work(settings: Settings) -> list[str]:
    """What the settings turn on of the work every `serve` and `worker` process does besides HTTP."""
    work = [
        ("webhook deliveries", settings.webhook_worker),
        ("audit sequencer", settings.audit_sequencer),
        ("idempotency purge", settings.idempotency_purge_interval_seconds > 0),
    ]
    return [name for name, on in work if on]


async def _check_connection_budget(settings: Settings) -> None:
    """Refuse to serve with more database connections than the server accepts, rather than fail with
    "too many clients" under load. Embedded mode sizes its server to fit (within a bound checked before it
    starts); another server is asked. The count is this command's own: other clients of that server (more
    hosts, psql) need room beyond it."""
    assert settings.database_url is not None
    db = await Database.connect(settings.database_url.get_secret_value(), min_size=1, max_size=1)
    try:
        limit = await connection_limit(db)
    finally:
        await db.close()
    if settings.serve_connections > limit.slots:
        raise ConfigurationError(
            f"{_connections_wanted(settings)}, but the database accepts {limit.slots} ({limit.source}): "
            f"lower either setting, or raise {limit.remedy}"
        )


def _serve_processes(settings: Settings, on_ready: Callable[[int], None]) -> None:
    """`settings.processes` server processes on one listening socket that this process binds and hands
    to each (the pre-fork model; the kernel gives each new connection to one of them). They are started
    fresh (spawn, not fork: nothing of this process's state, a PKCS#11 session least of all, is
    shared), each with its own pool and background tasks, which already allow any number of processes:
    the sequencer elects one leader, webhook deliveries are leased, the purges skip locked rows.

    This process only watches: SIGINT or SIGTERM is passed on to every server process, which stops as
    `bedside serve` does (in-flight requests finish), and if one of them ends on its own the others are
    stopped too and the command fails, so that a supervisor restarts the whole.

    The servers keep their request metrics in files in a directory of this run's own, which every scrape
    adds up (`HttpMetrics`). A server that ends leaves its files: prometheus_client's `mark_process_dead`
    only removes those of live gauges, of which there are none, and the requests a process served stay
    counted, as counters should; the others are stopped then anyway."""
    settings = _keys_made_once(settings)
    context = multiprocessing.get_context("spawn")
    children: dict[int, SpawnProcess] = {}  # by sentinel
    with contextlib.ExitStack() as stack:
        woken = _woken_by_signals(stack)
        # Private (mkdtemp makes it 0700) and removed once every server has stopped, however this ends:
        # entered before `_stop_all` is, so left after it.
        metrics_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bedside-metrics-")))
        # `lifeline` is never written: when this process ends, however it ends, the servers read
        # end-of-file from it. This process keeps only `lifeline_end`, closed after the servers stopped.
        lifeline, lifeline_end = context.Pipe(duplex=False)
        stack.callback(lifeline_end.close)
        stack.callback(_stop_all, children, settings.shutdown_timeout_seconds + 10)
        ready: dict[Connection, SpawnProcess] = {}
        with _listening_socket(settings) as sock, lifeline:
            port = sock.getsockname()[1]
            # A spawned server gets this process's environment: the variable is there when it first imports
            # prometheus_client. This process counts no requests, and its environment is put back.
            with _environment(SHARED_DIR_VARIABLE, str(metrics_dir)):
                for index in range(settings.processes):
                    parent_end, child_end = context.Pipe(duplex=False)
                    stack.callback(parent_end.close)
                    with child_end:
                        child = context.Process(
                            target=_server_process,
                            args=(settings, sock, child_end, lifeline, REQUEST_META.get(), metrics_dir),
                            name=f"bedside-serve-{index}",
                        )
                        child.start()
                    children[child.sentinel] = child
                    ready[parent_end] = child
        # The servers hold the socket and the lifeline's reading end now, this process neither: the port
        # stops listening as soon as the last server does.
        # A stop request wins over whatever else is ready with it (on Ctrl-C the servers get the SIGINT too).
        while ready:
            found = wait([woken, *ready, *children])
            if woken in found:
                log.info("http.stopping")
                return
            # A server that could not start says why on its pipe before it ends: pipes are read first.
            ended = min(found, key=lambda item: isinstance(item, int))
            if isinstance(ended, int):
                raise CliError(f"a server process {_ending(children[ended])} while starting")
            assert isinstance(ended, Connection)
            child = ready.pop(ended)
            try:
                problem = ended.recv()
            except EOFError:  # it ended before it said it was listening
                raise CliError(f"a server process {_ending(child)} while starting") from None
            if problem is not None:  # it could not start, and said why: as one process would
                raise CliError(problem)
        log.info("http.listening", host=settings.host, port=port, processes=settings.processes)
        on_ready(port)
        found = wait([woken, *children])
        if woken in found:
            log.info("http.stopping")
            return
        assert isinstance(found[0], int)
        gone = children[found[0]]
        raise CliError(f"server process {gone.name} {_ending(gone)}; the others were stopped")


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    """The environment variable `name` set to `value` meanwhile, then as it was before."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def _ignore_signal(signum: int, frame: object) -> None:
    """A handler that does nothing itself: the wake-up fd (see `_woken_by_signals`) carries the signal."""


def _woken_by_signals(stack: contextlib.ExitStack) -> socket.socket:
    """A socket that becomes readable when SIGINT or SIGTERM arrives, until `stack` closes. The handlers
    only wake this process up, so a signal never lands half-way through starting or stopping servers,
    and a second Ctrl-C does not cut the orderly stop short."""
    woken, waker = socket.socketpair()
    stack.enter_context(woken)
    stack.enter_context(waker)
    waker.setblocking(False)
    for signum in (signal.SIGINT, signal.SIGTERM):
        stack.callback(signal.signal, signum, signal.signal(signum, _ignore_signal))
    stack.callback(signal.set_wakeup_fd, signal.set_wakeup_fd(waker.fileno(), warn_on_full_buffer=False))
    return woken


def _listening_socket(settings: Settings) -> socket.socket:
    """The socket every server process accepts on, for an IPv4 or IPv6 host (as one process listens)."""
    family = socket.getaddrinfo(settings.host or None, settings.port, type=socket.SOCK_STREAM)[0][0]
    return socket.create_server((settings.host, settings.port), family=family, backlog=1024)


def _stop_all(children: Mapping[int, SpawnProcess], timeout: float) -> None:
    """SIGTERM to every server still running (each lets its requests finish), then wait for them all, up
    to `timeout` in total; any still running then is killed."""
    processes = list(children.values())
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


def _keys_made_once(settings: Settings) -> Settings:
    """Keys that this run may create when missing (embedded mode: the KEK file, the audit signing key)
    are made here, once, before the server processes start, which then only load them: several
    processes making the same key would race, and all but one would fail or, worse, use another key."""
    if settings.kek_provider == "file" and settings.kek_file_create:
        close_provider(build_kek_provider(settings))
    if settings.audit_signing_key_create:
        close_provider(build_audit_signer(settings))
    return settings.model_copy(update={"kek_file_create": False, "audit_signing_key_create": False})


def _ending(process: SpawnProcess) -> str:
    """How a server process that ended did: its exit status, or the signal that killed it."""
    process.join(5)  # it has ended (its sentinel fired); this reaps it so that its status is known
    code = process.exitcode
    if code is not None and code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def _server_process(
    settings: Settings,
    sock: socket.socket,
    ready: Connection,
    lifeline: Connection,
    meta: RequestMeta | None,
    metrics_dir: Path,
) -> None:
    """One of `_serve_processes`'s servers (a spawned interpreter): serve on the inherited socket until
    told to stop, or until the parent is gone (`lifeline` reads end-of-file). `ready` gets None once it
    listens, or the message of an operator's error that kept it from starting. `meta` is the request meta
    `main` set for this command: the events its background tasks audit (webhook deliveries) carry it, as
    they do in a single process. `metrics_dir` is where all the servers keep their request metrics."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # until the event loop's handlers are in place
    REQUEST_META.set(meta)
    configure_logging(settings.log_format, settings.log_level)

    def notify(port: int) -> None:
        ready.send(None)
        ready.close()

    try:
        _run_server(_serve(settings, notify, sock=sock, lifeline=lifeline, shared_metrics_dir=metrics_dir))
    except _OPERATOR_ERRORS as exc:
        if ready.closed:  # after start-up: nobody else will say it
            print(f"bedside: {_operator_message(exc)}", file=sys.stderr)
        else:  # the parent says it, once for all the servers, and exits 1
            ready.send(_operator_message(exc))
            ready.close()
        sys.exit(1)


def _run_server(server: Coroutine[Any, Any, None]) -> None:
    """Serve on uvloop's event loop where it is installed (a dependency except on Windows), else on
    asyncio's own. Measured in tests/perf/bench_messaging.py (c=64, three alternating pairs): 9% less
    service CPU per send and 6% per read, 9% more sends per second."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(server)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(server)


def _effective(settings: Settings, target: Target) -> Settings:
    """The settings a command runs with once its database is known. Embedded mode owns its key file,
    so it may create it on first use; elsewhere a missing key file is an error."""
    update: dict[str, object] = {"database_url": SecretStr(target.app_dsn)}
    if target.embedded:
        update["kek_file_create"] = True
        update["audit_signing_key_create"] = True
    return settings.model_copy(update=update)


async def _serve(
    settings: Settings,
    on_ready: Callable[[int], None],
    *,
    sock: socket.socket | None = None,
    lifeline: Connection | None = None,
    listen: bool = True,
    shared_metrics_dir: Path | None = None,
) -> None:
    """Run the app until SIGINT or SIGTERM: on `sock`, else on the settings' host and port, or (`listen`
    False: `bedside worker`) on none, so only its background tasks run. `on_ready` gets the bound port
    (0 when not listening). `shared_metrics_dir`: see `create_app`."""
    app = create_app(settings, shared_metrics_dir=shared_metrics_dir)
    runner = app_runner(app, shutdown_timeout=settings.shutdown_timeout_seconds)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        port = 0
        if listen:
            site = web.TCPSite(runner, settings.host, settings.port) if sock is None else web.SockSite(runner, sock)
            await site.start()
            port = runner.addresses[0][1]  # the one bound: BEDSIDE_PORT=0 asks for a free one
            if sock is None:
                log.info("http.listening", host=settings.host, port=port)
        else:
            log.info("worker.running")
        if lifeline is not None:
            # A server whose parent died without stopping it (SIGKILL, the OOM killer) stops as if told
            # to, rather than serve on where nothing watches or restarts it.
            def orphaned() -> None:
                loop.remove_reader(lifeline.fileno())
                stop.set()  # first: whoever read the logs may be gone too, and a write to them then fails
                log.warning("http.parent_gone")

            loop.add_reader(lifeline.fileno(), orphaned)
        on_ready(port)
        await stop.wait()
        log.info("http.stopping" if listen else "worker.stopping")
    finally:
        # Stops accepting, lets in-flight requests finish (up to the shutdown timeout), closes the pool.
        await runner.cleanup()


def _print_welcome(settings: Settings, effective: Settings, target: Target, port: int) -> None:
    """What `serve` prints once it listens; `port` is the bound one (BEDSIDE_PORT=0 asks for any free one)."""
    base = f"http://{effective.host}:{port}"
    lines = [f"Bedside {__version__} is serving on {base}"]
    if target.embedded:
        exe = Path(sys.argv[0]).resolve() if Path(sys.argv[0]).name == "bedside" else Path("bedside")
        prefix = ""
        if settings.data_dir.resolve() != (Path.cwd() / ".bedside").resolve():
            prefix = f"BEDSIDE_DATA_DIR={settings.data_dir.resolve()} "
        token = f"{prefix}{exe} token --tenant {DEMO_TENANT} --role patient --sub Patient/1"
        lines += [
            f"  embedded PostgreSQL data: {settings.data_dir.resolve()} (Ctrl-C stops both)",
            "  a development token for the demo tenant:",
            f"    {token}",
            "  try it:",
            f'    curl -s -H "Authorization: Bearer $({token})" {base}/v1/me',
        ]
    print("\n".join(lines), flush=True)


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    if args.status:
        with database_target(settings, "migrate") as target:
            applied, known, problem = _run(schema_report(target.owner_dsn or target.app_dsn))
        print(f"schema: {applied} of {known} migrations applied")
        if problem:
            print(f"problem: {problem}")
        return 0 if applied == known and problem is None else 1
    with database_target(settings, "migrate") as target:
        if not target.embedded:
            assert target.owner_dsn is not None
            ran = _run(migrate_database(target.owner_dsn))
            for migration in ran:
                print(f"applied {migration.version:04d}_{migration.name}")
            print("schema is current" if not ran else f"{len(ran)} migration(s) applied")
        else:
            print("schema is current (embedded database)")
    return 0


def cmd_tenant(settings: Settings, args: argparse.Namespace) -> int:
    async def create(target: Target) -> None:
        async with _services(target.app_dsn, settings) as (tenants, issuers):
            tenant = await tenants.create(args.name)
            if target.embedded:
                await _trust_dev_issuer(settings, issuers, tenant.slug)
            print(f"created tenant {tenant.slug} ({tenant.id})")

    async def listing(target: Target) -> None:
        async with _services(target.app_dsn, settings) as (tenants, _):
            for tenant in await tenants.all():
                print(f"{tenant.slug}\t{tenant.id}\t{tenant.created_at.isoformat()}")

    with database_target(settings, "tenant") as target:
        _run(create(target) if args.tenant_command == "create" else listing(target))
    return 0


def cmd_issuer(settings: Settings, args: argparse.Namespace) -> int:
    async def add(target: Target, pem: bytes) -> None:
        async with _services(target.app_dsn, settings) as (_, issuers):
            key = await issuers.add_key(args.tenant, args.issuer, pem, kid=args.kid, roles=args.roles)
        print(f"trusted issuer {args.issuer} in tenant {args.tenant} with key kid={key.kid}")
        print(f"its tokens may claim the roles {','.join(key.roles)}")
        if key.registered_by == "admin":
            print("note: a tenant admin registered this issuer: `bedside issuer list` shows its other keys")

    async def listing(target: Target) -> None:
        async with _services(target.app_dsn, settings) as (_, issuers):
            for key in await issuers.list_keys(args.tenant):
                state = "active" if key.revoked_at is None else f"revoked {key.revoked_at.isoformat()}"
                print(f"{key.issuer}\t{key.kid}\t{key.algorithm}\t{state}\t{','.join(key.roles)}\t{key.registered_by}")

    async def roles(target: Target) -> None:
        async with _services(target.app_dsn, settings) as (_, issuers):
            change = await issuers.set_roles(
                args.tenant, args.issuer, args.roles, trust_admin_registered=args.trust_admin_registered
            )
        print(f"issuer {change.issuer} in tenant {args.tenant}: roles {','.join(change.old)} -> {','.join(change.new)}")
        print(
            "running servers apply them within their BEDSIDE_ISSUER_CACHE_SECONDS "
            f"(here {settings.issuer_cache_seconds:g} s)"
        )

    async def revoke(target: Target) -> None:
        async with _services(target.app_dsn, settings) as (_, issuers):
            done = await issuers.revoke_key(args.tenant, args.issuer, args.kid)
        when = done.revoked_at.isoformat()
        what = f"key kid={done.key.kid} of issuer {done.key.issuer} in tenant {args.tenant}"
        print(f"revoked {what} at {when}" if done.newly_revoked else f"{what} was already revoked at {when}")
        for other_issuer, other_kid in done.also_revoked:  # one key under several names: before migration 0016
            print(f"revoked the same key under kid={other_kid} of issuer {other_issuer} too")
        if done.active_keys == 0:
            print("the issuer has no other key: it authenticates nobody until a key is added")
        else:
            print(f"{done.active_keys} other key(s) of the issuer still trusted")
        print(
            "running servers refuse its tokens within their BEDSIDE_ISSUER_CACHE_SECONDS "
            f"(here {settings.issuer_cache_seconds:g} s)"
        )

    operation: Callable[[Target], Awaitable[None]]
    if args.issuer_command == "add":
        try:
            pem = Path(args.public_key).read_bytes()
        except OSError as exc:
            raise CliError(f"cannot read {args.public_key}: {exc.strerror}") from None
        operation = functools.partial(add, pem=pem)
    else:
        operation = {"revoke": revoke, "roles": roles}.get(args.issuer_command, listing)
    # Each is a repair a refusing migration (0016, 0017) may ask for: it goes on after such a refusal.
    with database_target(settings, "issuer", repair=True) as target:
        _run(operation(target))
    return 0


@contextlib.asynccontextmanager
async def _key_operations(settings: Settings) -> AsyncIterator[KeyOperations]:
    assert settings.database_url is not None
    db = await Database.connect(settings.database_url.get_secret_value(), min_size=1, max_size=2)
    kek = KekClient(build_kek_provider(settings))
    try:
        keyring = PatientKeyring(DataKeyStore(), kek, DataKeyCache(max_entries=1))
        yield KeyOperations(db, TenantStore(), DataKeyStore(), kek, keyring, AuditRecorder(AuditStore(), db))
    finally:
        kek.close()
        close = getattr(kek.provider, "close", None)
        if callable(close):
            close()
        await db.close()


def _print_status(status: KeyStatus) -> None:
    print(
        f"KEK {status.kek_id}: primary version {status.primary_version}, "
        f"usable versions {', '.join(map(str, status.usable_versions))}"
    )
    for count in status.wraps:
        marker = "" if count.kek_id == status.kek_id else "  (another KEK: not readable with this one)"
        print(f"  version {count.kek_version}: {count.wraps} data key wrap(s){marker}")
    print(
        f"patient data keys: {status.live_keys} live, {status.shredded_keys} shredded; "
        f"{status.stale_wraps} wrap(s) under older versions"
    )


class ProgressBar:
    """A one-line progress bar on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, label: str) -> None:
        self._label = label
        self._tty = sys.stderr.isatty()
        self._last = -1

    def __call__(self, done: int, total: int) -> None:
        percent = 100 if total == 0 else min(100, done * 100 // total)
        if percent == self._last:
            return
        self._last = percent
        if self._tty:
            bar = "#" * (percent // 4) + "." * (25 - percent // 4)
            print(f"\r{self._label} [{bar}] {done}/{total} {percent:3d}%", end="", file=sys.stderr, flush=True)
            if done >= total:
                print(file=sys.stderr)
        elif percent % 10 == 0 or done >= total:
            print(f"{self._label}: {done}/{total} ({percent}%)", file=sys.stderr, flush=True)


def cmd_keys(settings: Settings, args: argparse.Namespace) -> int:
    async def run(effective: Settings) -> int:
        async with _key_operations(effective) as operations:
            if args.keys_command == "status":
                _print_status(await operations.operator_status(args.tenant))
            elif args.keys_command == "rotate":
                if not args.resume:
                    version = await operations.add_kek_version()
                    print(f"KEK version {version} is now primary")
                moved = await operations.rewrap(progress=ProgressBar("rewrapping"))
                print(f"rewrapped {moved} data key wrap(s)")
                if args.retire_old:
                    status = await operations.status()
                    for version in status.usable_versions:
                        if version != status.primary_version:
                            await operations.retire(version)
                            print(f"retired KEK version {version}")
            elif args.keys_command == "retire":
                await operations.retire(args.version)
                print(f"retired KEK version {args.version}")
            elif args.keys_command == "shred":
                result = await operations.shred(args.tenant, args.patient, args.confirm, actor="cli")
                print(
                    f"shredded {result.patient} in {args.tenant} at {result.shredded_at.isoformat()} "
                    f"(data key {result.dek_id}); their content can no longer be decrypted"
                )
        return 0

    if args.keys_command == "shred" and args.confirm is None:
        if not sys.stdin.isatty():
            raise CliError("shredding is irreversible: pass --confirm with the patient reference again")
        args.confirm = input(
            f"Destroy every readable copy of {args.patient}'s content? Type the patient reference to confirm: "
        ).strip()
    with database_target(settings, "keys") as target:
        return _run(run(_effective(settings, target)))


def _vkey(settings: Settings, public_key: str | None) -> str:
    """The log's public key: from --public-key (a vkey file), else from the signing key here."""
    if public_key is not None:
        try:
            return Path(public_key).read_text().strip()
        except OSError as exc:
            raise CliError(f"cannot read {public_key}: {exc.strerror}") from None
    if settings.audit_signer == "file" and not settings.audit_signing_key_path.exists():
        raise CliError(
            f"no audit signing key at {settings.audit_signing_key_path}: pass --public-key with the log's published key"
        )
    signer = build_audit_signer(settings)
    try:
        return format_vkey(signer.name, signer.public_key)
    finally:
        close = getattr(signer, "close", None)
        if callable(close):
            close()


def cmd_audit(settings: Settings, args: argparse.Namespace) -> int:
    if args.audit_command == "key":
        print(_vkey(settings, None))
        return 0
    if args.audit_command == "verify" and args.file:
        vkey = _vkey(settings, args.public_key)
        with open(args.file, encoding="utf-8") as handle:
            result = verify_export(handle, vkey=vkey, origin=parse_vkey(vkey).name)
        return _report(result)

    vkey = _vkey(settings, args.public_key) if args.audit_command == "verify" else ""
    trusted = [Path(path).read_text() for path in getattr(args, "trusted_checkpoint", [])]

    async def run(target: Target) -> int:
        assert target.owner_dsn is not None
        db = await Database.connect(target.owner_dsn, min_size=1, max_size=2)
        try:
            if args.audit_command == "checkpoint":
                async with db.session() as conn:
                    checkpoints = await AuditStore().all_checkpoints(conn)
                if not checkpoints:
                    raise CliError("no checkpoint yet: the audit log is empty")
                print(checkpoints[-1].note, end="")
                return 0
            result = await verify_database(
                db,
                AuditStore(),
                vkey=vkey,
                origin=parse_vkey(vkey).name,
                trusted=trusted,
                progress=ProgressBar("verifying"),
            )
            return _report(result)
        finally:
            await db.close()

    with database_target(settings, "audit") as target:
        return _run(run(target))


def _report(result: VerifyResult) -> int:
    if result.ok:
        print(f"ok: {result.leaves} leaves and {result.checkpoints} signed checkpoint(s) verified")
        return 0
    print(f"FAILED at index {result.first_bad_index}: {result.problem}")
    return 1


def cmd_token(settings: Settings, args: argparse.Namespace) -> int:
    if not settings.embedded:
        raise CliError(
            "the development issuer exists only in embedded mode (no BEDSIDE_DATABASE_URL); "
            "in production the EHR portal mints tokens with its own registered key"
        )
    path = _dev_key_path(settings)
    if not path.exists():
        raise CliError(f"no development issuer key at {path}: run `bedside serve` once first")
    role = Role(args.role)
    expected = SUBJECT_TYPE[role]
    if not is_reference(args.sub, expected):
        raise CliError(f"--sub must be a FHIR-style reference{' to a ' + expected if expected else ''}, e.g. Patient/1")
    if role is Role.PROXY and not is_reference(args.act_for, "Patient"):
        raise CliError("a proxy token needs --act-for Patient/<id>")
    if role is not Role.PROXY and args.act_for is not None:
        raise CliError("--act-for is only for the proxy role")
    try:
        pair = issuer_key_pair_from_private_pem(path.read_bytes())
    except IssuerKeyError as exc:
        raise CliError(f"{path}: {exc}") from None
    print(
        mint_token(
            pair,
            issuer=DEV_ISSUER,
            audience=settings.audience,
            tenant=args.tenant,
            role=role.value,
            subject=args.sub,
            act_for=args.act_for,
            lifetime_seconds=args.ttl,
        )
    )
    return 0


# -- parsing ------------------------------------------------------------------------------------------


def _role_list(text: str) -> frozenset[Role]:
    """`--roles`: role names separated by commas, at least one."""
    try:
        roles = parse_roles(text)
    except ValueError:
        unknown = sorted({name.strip() for name in text.split(",")} - {role.value for role in Role})
        raise argparse.ArgumentTypeError(
            f"unknown role {', '.join(repr(name) for name in unknown)}: "
            f"the roles are {', '.join(role.value for role in Role)}"
        ) from None
    if not roles:
        raise argparse.ArgumentTypeError("at least one role (to stop an issuer, revoke its keys)")
    return roles


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bedside",
        description="Bedside: encrypted-at-rest patient-physician secure messaging.",
        epilog="With no database URL (BEDSIDE_DATABASE_URL or --database-url), commands use the embedded "
        "PostgreSQL in BEDSIDE_DATA_DIR (default .bedside/).",
    )
    parser.add_argument("--version", action="version", version=f"bedside {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_db(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--database-url", help="postgresql:// URL (default: BEDSIDE_DATABASE_URL, else embedded)")
        return p

    serve = with_db(sub.add_parser("serve", help="run the HTTP service"))
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8080)")
    serve.set_defaults(func=cmd_serve)

    worker = with_db(
        sub.add_parser(
            "worker", help="run the background work (webhook deliveries, audit sequencer, idempotency purge), no HTTP"
        )
    )
    worker.set_defaults(func=cmd_worker)

    migrate = with_db(sub.add_parser("migrate", help="apply database migrations (run as the owner role)"))
    migrate.add_argument("--status", action="store_true", help="report, change nothing; exit 1 if not current")
    migrate.set_defaults(func=cmd_migrate)

    tenant = sub.add_parser("tenant", help="manage tenants (health systems, clinics)")
    tenant_sub = tenant.add_subparsers(dest="tenant_command", required=True, metavar="ACTION")
    create = with_db(tenant_sub.add_parser("create", help="create a tenant"))
    create.add_argument("name", help="slug such as acme: what tokens carry in `tid`")
    with_db(tenant_sub.add_parser("list", help="list tenants"))
    tenant.set_defaults(func=cmd_tenant)

    issuer = sub.add_parser("issuer", help="manage the JWT issuers (EHR portals) a tenant trusts")
    issuer_sub = issuer.add_subparsers(dest="issuer_command", required=True, metavar="ACTION")
    add = with_db(issuer_sub.add_parser("add", help="trust an issuer's public key in a tenant"))
    add.add_argument("--tenant", required=True)
    add.add_argument("--issuer", required=True, help="the tokens' `iss`")
    add.add_argument("--public-key", required=True, help="PEM file: Ed25519, P-256 or RSA >= 2048")
    add.add_argument("--kid", help="key id the tokens name in their header (default: key fingerprint)")
    add.add_argument(
        "--roles",
        type=_role_list,
        help="a new issuer: the roles its tokens may claim, e.g. patient,proxy (default: all six); an existing "
        "issuer keeps its own (change them with `issuer roles`)",
    )
    listing = with_db(
        issuer_sub.add_parser(
            "list", help="list a tenant's issuer keys (revoked ones with when), their issuers' roles and registrant"
        )
    )
    listing.add_argument("--tenant", required=True)
    revoke = with_db(issuer_sub.add_parser("revoke", help="stop trusting an issuer's key (for good)"))
    revoke.add_argument("--tenant", required=True)
    revoke.add_argument("--issuer", required=True, help="the tokens' `iss`")
    revoke.add_argument("--kid", required=True, help="the key's kid, as `issuer list` shows it")
    roles = with_db(issuer_sub.add_parser("roles", help="set the roles an existing issuer's tokens may claim"))
    roles.add_argument("--tenant", required=True)
    roles.add_argument("--issuer", required=True, help="the tokens' `iss`")
    roles.add_argument("--roles", required=True, type=_role_list, help="e.g. physician,staff (at least one)")
    roles.add_argument(
        "--trust-admin-registered",
        action="store_true",
        help="an issuer a tenant admin registered: give it roles beyond BEDSIDE_ADMIN_ISSUER_ROLES all the same "
        "(every key of it gets them, the admin's included; recorded in the audit event)",
    )
    issuer.set_defaults(func=cmd_issuer)

    keys = sub.add_parser("keys", help="key-encryption keys: status, rotation, crypto-shredding")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    status = with_db(keys_sub.add_parser("status", help="KEK versions and how many data keys each wraps"))
    status.add_argument("--tenant", help="one tenant only")
    rotate = with_db(keys_sub.add_parser("rotate", help="new primary KEK version, then rewrap every data key"))
    rotate.add_argument("--resume", action="store_true", help="only finish an interrupted rewrap")
    rotate.add_argument("--retire-old", action="store_true", help="then destroy the older versions (irreversible)")
    retire = with_db(keys_sub.add_parser("retire", help="destroy a KEK version no data key uses (irreversible)"))
    retire.add_argument("--version", type=int, required=True)
    shred = with_db(keys_sub.add_parser("shred", help="crypto-shred a patient's content (irreversible)"))
    shred.add_argument("--tenant", required=True)
    shred.add_argument("--patient", required=True, help="e.g. Patient/1")
    shred.add_argument("--confirm", help="repeat the patient reference (else asked interactively)")
    keys.set_defaults(func=cmd_keys)

    audit = sub.add_parser("audit", help="the tamper-evident audit log: verify, checkpoint, key")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    verify = with_db(audit_sub.add_parser("verify", help="recompute the log and check every signed checkpoint"))
    verify.add_argument("--file", help="verify an export file offline instead of the database")
    verify.add_argument("--public-key", help="file with the log's public key (vkey); default: from the signing key")
    verify.add_argument(
        "--trusted-checkpoint", action="append", default=[], help="a checkpoint published earlier (repeatable)"
    )
    with_db(audit_sub.add_parser("checkpoint", help="print the latest signed checkpoint, for publishing"))
    audit_sub.add_parser("key", help="print the log's public key (vkey), for verifiers")
    audit.set_defaults(func=cmd_audit)

    token = sub.add_parser("token", help="print a development token (embedded mode only)")
    token.add_argument("--tenant", default=DEMO_TENANT)
    token.add_argument("--role", required=True, choices=[r.value for r in Role])
    token.add_argument("--sub", required=True, help="FHIR-style reference, e.g. Patient/1")
    token.add_argument("--act-for", help="for a proxy: the patient, e.g. Patient/1")
    token.add_argument("--ttl", type=int, default=900, help="lifetime in seconds (at most 3600)")
    token.set_defaults(func=cmd_token)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides: dict[str, object] = {}
    for name in ("database_url", "host", "port"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    REQUEST_META.set(RequestMeta(request_id=f"cli-{uuid.uuid4().hex}", source="cli"))
    try:
        settings = load_settings(**overrides)
        configure_logging(settings.log_format, settings.log_level)
        if getattr(args, "ttl", 0) and not 60 <= args.ttl <= settings.jwt_max_lifetime_seconds:
            raise CliError(f"--ttl must be between 60 and {settings.jwt_max_lifetime_seconds} seconds")
        result: int = args.func(settings, args)
        return result
    except SettingsError as exc:
        print(f"bedside: {exc}", file=sys.stderr)
        return 2
    except _OPERATOR_ERRORS as exc:
        print(f"bedside: {_operator_message(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
