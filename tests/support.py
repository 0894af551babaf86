"""Helpers the tests share: token issuers with real keys, canaries, every audit event as the owner
sees it, and the server processes under a `bedside serve`."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import signal
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

AUDIENCE = "bedside"

# The columns an audit event has before and after the sequencer integrates it.
_EVENT_COLUMNS = (
    "event_id, occurred_at, tenant_id, action, outcome, actor, actor_role, issuer, act_for, patient, "
    "resource_type, resource_id, purpose, request_id, source, details, entry"
)
# Every audit event, whether it still waits in the outbox or is integrated: a test does not wait for the
# sequencer. `details` comes back as JSON text.
AUDIT_EVENTS = (
    f"(SELECT {_EVENT_COLUMNS} FROM audit_outbox UNION ALL SELECT {_EVENT_COLUMNS} FROM audit_leaves) AS events"  # noqa: S608
)


async def as_owner(owner_dsn: str, work: Callable[[asyncpg.Connection], Awaitable[Any]]) -> Any:
    """`work` on a connection of the owner role (no row-level security), closed afterwards."""
    conn = await asyncpg.connect(owner_dsn)
    try:
        return await work(conn)
    finally:
        await conn.close()


async def owner_count(owner_dsn: str, query: str, *args: object) -> int:
    """The count that `query` (a `SELECT count(*) ...`) finds, read as the owner role (no row-level security)."""
    count: int = await as_owner(owner_dsn, lambda conn: conn.fetchval(query, *args))
    return count


async def blocked_by(conn: asyncpg.Connection, blocker: int) -> int:
    """The pid of the backend that waits for a lock the backend `blocker` holds, once one does."""
    for _ in range(200):
        pid = await conn.fetchval("SELECT pid FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))", blocker)
        if pid is not None:
            return int(pid)
        await asyncio.sleep(0.025)
    raise AssertionError(f"no backend waited for backend {blocker}")


@contextlib.asynccontextmanager
async def database_connection_limit(owner_dsn: str, database: str, limit: int) -> AsyncIterator[None]:
    """The database's CONNECTION LIMIT set to `limit` (0: no new connections but a superuser's), and
    lifted again (-1) however the block ends."""

    async def set_limit(value: int) -> None:
        await as_owner(owner_dsn, lambda conn: conn.execute(f'ALTER DATABASE "{database}" CONNECTION LIMIT {value}'))

    await set_limit(limit)
    try:
        yield
    finally:
        await set_limit(-1)


@contextlib.asynccontextmanager
async def database_read_only(owner_dsn: str, database: str) -> AsyncIterator[None]:
    """Sessions opened in `database` from now on refuse writes (SQLSTATE 25006), as on a hot standby or a
    demoted primary; sessions already open are not changed. Undone however the block ends."""

    async def read_write(conn: asyncpg.Connection) -> None:
        await conn.execute("SET default_transaction_read_only = off")  # the owner's session is one of them
        await conn.execute(f'ALTER DATABASE "{database}" RESET default_transaction_read_only')

    await as_owner(
        owner_dsn, lambda conn: conn.execute(f'ALTER DATABASE "{database}" SET default_transaction_read_only = on')
    )
    try:
        yield
    finally:
        await as_owner(owner_dsn, read_write)


async def end_service_sessions(owner_dsn: str) -> int:
    """End the service's sessions in the owner's database, as a failover does, and wait (5 s at most) until
    they are gone, so that no request meets a backend still on its way out. How many there were."""
    ended: int = await as_owner(
        owner_dsn,
        lambda conn: conn.fetchval(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = 'bedside'"
        ),
    )
    return ended


@contextlib.contextmanager
def unreadable(path: Path) -> Iterator[None]:
    """`path` replaced by a symlink to itself (opening it fails with ELOOP, as root too), then restored."""
    aside = path.with_name(path.name + ".aside")
    path.rename(aside)
    path.symlink_to(path.name)
    try:
        yield
    finally:
        path.unlink()
        aside.rename(path)


async def audit_events(owner_dsn: str, where: str, *args: object) -> list[asyncpg.Record]:
    """The audit events that match the SQL condition `where` (on `AUDIT_EVENTS`' columns, with `$n`
    arguments), oldest first, read on a connection of the owner role (no row-level security)."""
    owner = await asyncpg.connect(owner_dsn)
    try:
        return await owner.fetch(f"SELECT * FROM {AUDIT_EVENTS} WHERE {where} ORDER BY occurred_at", *args)  # noqa: S608
    finally:
        await owner.close()


def canary(label: str = "canary") -> str:
    """A unique string that must never show up where patient content does not belong."""
    return f"CANARY-{label}-{uuid.uuid4().hex}"


def server_processes(parent: int) -> list[int]:
    """The spawned server processes under `bedside serve` (not its PostgreSQL or helper processes)."""
    children = [int(c) for t in Path(f"/proc/{parent}/task").iterdir() for c in (t / "children").read_text().split()]
    return [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def watchdogs(data_dir: Path) -> list[int]:
    """The live processes watching the embedded PostgreSQL in `data_dir` (service/embedded_watch.py),
    whoever their parent is now."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"service.embedded_watch" in argv and str(data_dir.resolve()).encode() in argv and alive(int(proc.name)):
            found.append(int(proc.name))
    return found


def postmaster_pid(pgdata: Path) -> int:
    """The pid of the server running on `pgdata` (the first line of its postmaster.pid)."""
    return int((pgdata / "postmaster.pid").read_text().splitlines()[0])


def alive(pid: int) -> bool:
    """Still running: not gone, and not a zombie waiting for a parent that is gone too."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_until(condition: Callable[[], bool], seconds: float) -> bool:
    """Whether `condition` came true within `seconds` (polled every 0.1 s)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """`pid` stopped (SIGSTOP) meanwhile, then let go on (SIGCONT) whatever happened: a server process
    frozen so that the others take every new connection."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


@dataclass
class TestIssuer:
    """An EHR portal's token issuer with a real key pair, as the portal would hold it."""

    __test__ = False

    tenant: str
    issuer: str
    algorithm: str = "EdDSA"
    kid: str = "portal-key-1"
    private_key: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.private_key is None:
            self.private_key = {
                "EdDSA": lambda: ed25519.Ed25519PrivateKey.generate(),
                "ES256": lambda: ec.generate_private_key(ec.SECP256R1()),
                "RS256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
            }[self.algorithm]()

    @property
    def public_pem(self) -> bytes:
        return bytes(
            self.private_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def claims(self, *, role: str = "patient", sub: str = "Patient/1", **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": sub,
            "aud": AUDIENCE,
            "iat": now,
            "exp": now + 300,
            "tid": self.tenant,
            "role": role,
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def token(
        self, *, role: str = "patient", sub: str = "Patient/1", headers: dict[str, Any] | None = None, **overrides: Any
    ) -> str:
        return jwt.encode(
            self.claims(role=role, sub=sub, **overrides),
            self.private_key,
            algorithm=self.algorithm,
            headers={"kid": self.kid, **(headers or {})},
        )

    def auth(self, **kwargs: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(**kwargs)}"}

    @property
    def fingerprint(self) -> str:
        """The public key's SHA-256 fingerprint as a portal computes it: base64url, no padding, of the DER
        SubjectPublicKeyInfo (also the default kid)."""
        der = self.private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()

    def endorse(self, new_key: TestIssuer, *, headers: dict[str, Any] | None = None, **overrides: Any) -> str:
        """An endorsement of `new_key` signed with this key, as the portal signs one before it asks a tenant
        admin to register its next key: these claims and headers changed (None removes one)."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "tid": self.tenant,
            "aud": AUDIENCE,
            "purpose": "issuer-key-endorsement",
            "key": new_key.fingerprint,
            "iat": now,
            "exp": now + 300,
        }
        claims.update(overrides)
        return jwt.encode(
            {k: v for k, v in claims.items() if v is not None},
            self.private_key,
            algorithm=self.algorithm,
            headers={k: v for k, v in {"kid": self.kid, **(headers or {})}.items() if v is not None},
        )


class DatabaseLink:
    """A TCP link to the test's PostgreSQL that the test can cut, for the service to connect through.

    `outage()` closes every connection through it and refuses the next one, as a failover does; the
    connections after that go through again. After `linger()`, a connection open at that moment that the
    server then ends keeps its client's side open until the client next writes: the server's last words (a
    FATAL error) arrive, its closing does not yet, as when the end is still on its way. `ends` counts the
    connections whose server side has closed, whoever ended them, once their last words went to the client:
    take it before ending one, and wait for one more."""

    def __init__(self, upstream: str) -> None:
        self._upstream = urllib.parse.urlsplit(upstream)
        self._refuse = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._clients: set[asyncio.StreamWriter] = set()
        self._lingering: set[asyncio.StreamWriter] = set()
        self.ends = 0

    @property
    def dsn(self) -> str:
        """The upstream URL, pointed at this link."""
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        netloc = self._upstream.netloc.rsplit("@", 1)[0] + f"@127.0.0.1:{port}"
        return urllib.parse.urlunsplit(("postgresql", netloc, self._upstream.path, "sslmode=disable", ""))

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)

    async def close(self) -> None:
        self._cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def outage(self) -> None:
        self._cut()
        self._refuse = 1

    def cut(self) -> None:
        """Close every connection through the link, as a restart does; the next ones go through."""
        self._cut()

    def linger(self) -> None:
        self._lingering = set(self._clients)

    async def wait_for_ends(self, count: int) -> None:
        """Until the server has ended `count` connections through the link, and the client has read what
        the link passed on: a turn of the loop for its reader after the last write."""
        for _ in range(200):
            if self.ends >= count:
                for _ in range(3):
                    await asyncio.sleep(0)
                return
            await asyncio.sleep(0.025)
        raise AssertionError(f"{self.ends} of {count} connections ended")

    async def end_idle(self, owner_dsn: str, backend: int) -> None:
        """End `backend`, a session through the link that sits idle, as a failover does, with its closing
        held back (`linger`); return once its client has read the server's FATAL error."""
        self.linger()
        ended = self.ends  # before the end: the count may go up as soon as it is asked for
        assert await as_owner(owner_dsn, lambda conn: conn.fetchval("SELECT pg_terminate_backend($1)", backend))
        await self.wait_for_ends(ended + 1)

    def _cut(self) -> None:
        for writer in self._writers:
            writer.close()

    async def _open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        query = urllib.parse.parse_qs(self._upstream.query)
        if "host" in query:  # a Unix socket directory
            return await asyncio.open_unix_connection(f"{query['host'][0]}/.s.PGSQL.{query['port'][0]}")
        return await asyncio.open_connection(self._upstream.hostname, self._upstream.port)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refuse:
            self._refuse -= 1
            writer.close()
            return
        up_reader, up_writer = await self._open_upstream()
        self._writers |= {writer, up_writer}
        self._clients.add(writer)

        async def to_client() -> None:
            with contextlib.suppress(OSError):
                while data := await up_reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            self.ends += 1
            if writer not in self._lingering:
                writer.close()

        async def to_server() -> None:
            with contextlib.suppress(OSError):
                while data := await reader.read(65536):
                    if up_reader.at_eof():
                        break  # the server has ended this connection: the client learns it now
                    up_writer.write(data)
                    await up_writer.drain()
            up_writer.close()
            writer.close()

        await asyncio.gather(to_client(), to_server())
        self._writers -= {writer, up_writer}
        self._clients.discard(writer)
        self._lingering.discard(writer)
