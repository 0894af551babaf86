"""A private PostgreSQL for development: initdb + pg_ctl into a data directory, reused across runs.

Embedded mode is what runs when no database URL is given. It listens on 127.0.0.1 only, on a free port,
and on a Unix socket in a private directory beside its data (0700, the server's user only), with password
(SCRAM) authentication for every connection on either. Bedside itself connects through the socket: a
round trip over it costs both sides less CPU than one over loopback TCP. PostgreSQL refuses to run as
root, so under root the server runs as the `postgres` system user (created by Debian's package).

A server's life is tied to its owner's, the process that started it (or that `serve` adopted it from a
run that was killed): a watchdog process (service/embedded_watch.py) waits on a pipe that only the owner
holds open and stops the server when the owner ends without doing so itself, even when it was SIGKILLed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

OWNER_ROLE = "bedside_owner"
APP_LOGIN_ROLE = "bedside_web"
# max_connections: never below this, and this many beyond what `bedside serve` may hold, for PostgreSQL's
# superuser reserve (3) and the commands that join a running serve (psql; `bedside tenant`, `keys`,
# `audit`: two or three connections each).
MIN_MAX_CONNECTIONS = 200
SPARE_CONNECTIONS = 25
# ... and never above this. PostgreSQL reserves shared memory for every slot when it starts, used or not
# (a process entry, its share of the lock table, on Linux its semaphore: about 46 KB each; PostgreSQL 15
# needs 148 MB at 200, 322 MB at 4000, 1.6 GB at 32000), and every connection in use is a server process
# of its own. 4000 admits the default pool in all 64 processes BEDSIDE_PROCESSES allows, or the largest
# pool in 7; a deployment that needs more wants a server of its own (BEDSIDE_DATABASE_URL), sized for it.
MAX_MAX_CONNECTIONS = 4000
# The most connections the service may hold at once on the embedded PostgreSQL.
MAX_SERVICE_CONNECTIONS = MAX_MAX_CONNECTIONS - SPARE_CONNECTIONS
INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found. Install them with:\n"
    "    sudo apt-get install -y postgresql\n"
    "or set BEDSIDE_DATABASE_URL to use an existing server."
)


class EmbeddedError(Exception):
    """The embedded database cannot be set up or started; the message says what to do."""


def find_pg_bindir() -> Path:
    """Where initdb/pg_ctl/postgres live: PATH first, then Debian's /usr/lib/postgresql/N/bin (newest)."""
    on_path = shutil.which("pg_ctl")
    if on_path:
        bindir = Path(on_path).resolve().parent
        if all((bindir / name).exists() for name in ("initdb", "postgres")):
            return bindir
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    for bindir in candidates:
        if all((bindir / name).exists() for name in ("initdb", "pg_ctl", "postgres")):
            return bindir
    raise EmbeddedError(INSTALL_HINT)


# A socket's path is `<dir>/.s.PGSQL.<port>`, at most 107 bytes on Linux; pg_ctl passes the directory
# through a shell, so it must need no quoting. Past either limit the cluster listens on TCP only.
_SOCKET_DIR_MAX = 90
_SOCKET_DIR_CHARS = re.compile(r"^[A-Za-z0-9/._-]+$")


def socket_dir_usable(directory: Path) -> bool:
    """Whether the server can be given `directory` for its Unix socket (short enough, nothing to quote)."""
    text = str(directory)
    return len(text) <= _SOCKET_DIR_MAX and bool(_SOCKET_DIR_CHARS.match(text))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _write_secret(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(value)
    os.chmod(path, 0o600)


def read_or_create_secret(path: Path) -> str:
    """A random password kept in a 0600 file, made on first use."""
    if path.exists():
        return path.read_text().strip()
    value = secrets.token_urlsafe(32)
    _write_secret(path, value)
    return value


@dataclass(frozen=True, slots=True)
class Connection:
    """How to reach the running embedded server."""

    port: int
    owner_password: str
    app_password: str
    socket_dir: Path | None = None

    def dsn(self, *, database: str = "bedside", owner: bool = False) -> str:
        """A URL for the Unix socket when the server has one, else for 127.0.0.1."""
        user, password = (OWNER_ROLE, self.owner_password) if owner else (APP_LOGIN_ROLE, self.app_password)
        if self.socket_dir is None:
            return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{database}"
        host = urllib.parse.quote(str(self.socket_dir), safe="/")
        return f"postgresql://{user}:{password}@/{database}?host={host}&port={self.port}"


class EmbeddedPostgres:
    """One PostgreSQL cluster in `data_dir/pgdata`. Secrets live beside it in 0600 files."""

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir.resolve()
        self._bindir: Path | None = None
        self._as_postgres = os.geteuid() == 0
        self.pgdata = self._cluster_home() / "pgdata"
        self.logfile = self._cluster_home() / "postgres.log"
        self.socket_dir = self._cluster_home() / "socket"
        # The watchdog of the server this process owns, and the pipe it waits on (see `watch`).
        self._watchdog: subprocess.Popen[bytes] | None = None

    # -- layout ------------------------------------------------------------------------------------

    def _cluster_home(self) -> Path:
        """Normally `data_dir` itself. Under root, if the postgres user cannot reach it (a project in
        /root, say), the cluster lives in /var/lib/bedside/<hash of data_dir> instead."""
        if not self._as_postgres or self._postgres_can_reach(self.root):
            return self.root
        digest = hashlib.sha256(str(self.root).encode()).hexdigest()[:16]
        return Path("/var/lib/bedside") / digest

    @staticmethod
    def _postgres_can_reach(path: Path) -> bool:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            return False
        probe = path
        while not probe.exists():
            probe = probe.parent
        for parent in [probe, *probe.parents]:
            mode = parent.stat().st_mode
            owner_ok = parent.stat().st_uid == user.pw_uid and mode & 0o100
            if not (owner_ok or mode & 0o001):
                return False
        return True

    @property
    def bindir(self) -> Path:
        if self._bindir is None:
            self._bindir = find_pg_bindir()
        return self._bindir

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self._as_postgres:
            if shutil.which("runuser") is None:
                raise EmbeddedError("running as root needs `runuser` (util-linux) to start PostgreSQL")
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(
            command, cwd=self.pgdata.parent, capture_output=True, text=True, check=False, timeout=120
        )
        if check and result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
            raise EmbeddedError(f"{args[0]} failed:\n  " + "\n  ".join(tail))
        return result

    def _prepare_dirs(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o711 if self._as_postgres else 0o700)
        home = self.pgdata.parent
        home.mkdir(parents=True, exist_ok=True)
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        if self._as_postgres:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                raise EmbeddedError(
                    "running as root, but there is no `postgres` system user to run PostgreSQL as; "
                    "install Debian's postgresql package (it creates one) or run as a normal user"
                ) from None
            if home != self.root:
                os.chown(home, user.pw_uid, user.pw_gid)
            os.chown(self.pgdata, user.pw_uid, user.pw_gid)
            if not self.logfile.exists():
                self.logfile.touch(mode=0o600)
            os.chown(self.logfile, user.pw_uid, user.pw_gid)

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def initialized(self) -> bool:
        return (self.pgdata / "PG_VERSION").exists()

    def initialize(self) -> None:
        """initdb with a generated owner password and SCRAM authentication for every connection."""
        self._prepare_dirs()
        owner_password = read_or_create_secret(self.root / "owner-password")
        read_or_create_secret(self.root / "app-password")
        pwfile = self.pgdata.parent / ".initdb-pwfile"
        _write_secret(pwfile, owner_password + "\n")
        if self._as_postgres:
            user = pwd.getpwnam("postgres")
            os.chown(pwfile, user.pw_uid, user.pw_gid)
        try:
            self._run(
                "initdb",
                "-D",
                str(self.pgdata),
                "-U",
                OWNER_ROLE,
                f"--pwfile={pwfile}",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--no-locale",
            )
        finally:
            pwfile.unlink(missing_ok=True)

    def _is_running(self) -> bool:
        """Whether a server runs on this data directory (pg_ctl's own judgement: a live postmaster)."""
        if not self.initialized:
            return False
        return self._run("pg_ctl", "status", "-D", str(self.pgdata), check=False).returncode == 0

    def _postmaster(self) -> tuple[int, Path | None] | None:
        """The running server's port and Unix socket directory (None: TCP only), or None when no server
        runs. postmaster.pid is read once, for both: its fourth line and its fifth (empty for TCP only)."""
        if not self._is_running():
            return None
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
            port = int(lines[3])
        except (OSError, IndexError, ValueError):
            return None
        socket_dir = Path(lines[4]) if len(lines) > 4 and lines[4].strip() else None
        return port, socket_dir

    def running(self) -> Connection | None:
        """How to reach the server running on this data directory, or None."""
        postmaster = self._postmaster()
        if postmaster is None:
            return None
        port, socket_dir = postmaster
        return Connection(
            port=port,
            owner_password=read_or_create_secret(self.root / "owner-password"),
            app_password=read_or_create_secret(self.root / "app-password"),
            socket_dir=socket_dir,
        )

    def running_port(self) -> int | None:
        """The port of the server running on this data directory, or None."""
        postmaster = self._postmaster()
        return None if postmaster is None else postmaster[0]

    def _socket_options(self) -> str:
        """The server options for the private socket directory, made here; for TCP only, the option that
        turns Unix sockets off (`-c unix_socket_directories=''`)."""
        if not socket_dir_usable(self.socket_dir):
            return "-c unix_socket_directories=''"
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.socket_dir, 0o700)
        if self._as_postgres:
            user = pwd.getpwnam("postgres")
            os.chown(self.socket_dir, user.pw_uid, user.pw_gid)
        return f"-c unix_socket_directories={self.socket_dir} -c unix_socket_permissions=0700"

    def start(self, *, durable: bool = True, connections: int = 0, discard: bool = False) -> Connection:
        """Start the server on a free loopback port (initdb first if needed); return how to reach it. It is
        stopped when this process ends without calling `stop` (see `watch`).

        `connections`: the most the service will hold at once; max_connections leaves room beyond them.
        `durable=False` turns fsync off, and `discard=True` makes the watchdog delete the whole data
        directory once it has stopped the server: both only for throwaway clusters such as the test suite's."""
        max_connections = max(MIN_MAX_CONNECTIONS, connections + SPARE_CONNECTIONS)
        if not self.initialized:
            self.initialize()
        self._prepare_dirs()
        port = _free_port()
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={port} {self._socket_options()} "
            f"-c synchronous_commit=on -c max_connections={max_connections}"
        )
        options += " -c fsync=on" if durable else " -c fsync=off -c full_page_writes=off"
        # Watched from before it starts: an owner killed while pg_ctl waits for the server leaves none.
        self.watch(discard=discard)
        self._run(
            "pg_ctl",
            "start",
            "-D",
            str(self.pgdata),
            "-l",
            str(self.logfile),
            "-w",
            "-t",
            "60",
            "-o",
            options,
        )
        running = self.running()
        if running is None:
            raise EmbeddedError(f"PostgreSQL did not start; see {self.logfile}")
        return running

    def stop(self) -> bool:
        """A fast, clean shutdown (open transactions roll back, nothing committed is lost); then this
        process's watchdog, if any, is let go. Whether a server was running."""
        running = self._is_running()
        if running:
            self._run("pg_ctl", "stop", "-D", str(self.pgdata), "-m", "fast", "-w", "-t", "60")
        self._release_watchdog()
        return running

    # -- the watchdog ------------------------------------------------------------------------------

    def watch(self, *, discard: bool = False) -> None:
        """Make sure the server on this data directory does not outlive this process: a watchdog process
        stops it (pg_ctl stop -m fast) once this one has ended without calling `stop`, however it ended.

        The watchdog reads its stdin, a pipe whose writing end only this process holds: the kernel closes
        it when this process ends, SIGKILL included, and the watchdog reads end-of-file. `stop` writes a
        byte first, which lets the watchdog go without doing anything. The writing end is close-on-exec,
        as Python makes every descriptor, and every child here is started by exec (subprocess, pg_ctl,
        multiprocessing's spawn): none of them holds it, so none keeps the watchdog waiting by outliving
        this process. The watchdog gets no credentials (no environment but PATH and where to import this
        package from); in a session of its own, a Ctrl-C meant for this process does not reach it.

        `discard`: also delete the data directory afterwards (a throwaway cluster). Watching twice is once.
        """
        if self._watchdog is not None and self._watchdog.poll() is None:
            return
        package_root = Path(__file__).resolve().parent.parent
        # -P: not the working directory (`/`) first on its import path; PYTHONPATH says where Bedside is.
        command = [sys.executable, "-P", "-m", "service.embedded_watch", str(self.root), str(os.getpid())]
        self._watchdog = subprocess.Popen(
            [*command, "--discard"] if discard else command,
            stdin=subprocess.PIPE,
            bufsize=0,  # `stop`'s byte goes straight to the pipe
            stdout=subprocess.DEVNULL,
            # Its one line goes where this process's own messages go.
            stderr=None,
            cwd="/",
            env={"PATH": os.environ.get("PATH", os.defpath), "PYTHONPATH": str(package_root)},
            close_fds=True,
            start_new_session=True,
        )

    def _release_watchdog(self) -> None:
        """Tell the watchdog that this process stopped the server itself, and wait for it to end."""
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is None:
            return
        assert watchdog.stdin is not None
        with contextlib.suppress(BrokenPipeError):  # it has ended already (killed by someone)
            watchdog.stdin.write(b"stopped")
        watchdog.stdin.close()
        try:
            watchdog.wait(timeout=10)
        except subprocess.TimeoutExpired:
            watchdog.kill()
            watchdog.wait()


_LOCK_NAME = "bedside.lock"
# Held shared by each command that joined the cluster a `serve` holds (it takes no `_LOCK_NAME`), and
# exclusively by that `serve` (or its watchdog) while it stops the server: so it waits for them, not they
# for it. A watchdog waits for this one before it takes `_LOCK_NAME`; `serve`, which holds `_LOCK_NAME`,
# only tries this one now and then, for at most its shutdown timeout: nobody waits in a cycle.
_USERS_LOCK_NAME = "bedside.users.lock"
_HOLDER = re.compile(r"^(\d+) (\w+)$")
# What a watchdog holds the data directory for while it stops a server that its owner left behind.
WATCHDOG_PURPOSE = "watchdog"
# How long another command waits for a watchdog to do that (pg_ctl's own stop timeout, and some).
_WATCHDOG_WAIT_SECONDS = 90.0


class DataDirBusyError(EmbeddedError):
    """Another Bedside process holds this data directory."""


@contextlib.contextmanager
def exclusive_data_dir(data_dir: Path, purpose: str) -> Iterator[None]:
    """Hold the data directory for one process (a `serve`, or a CLI command that started the database).

    A second `serve` on the same directory is refused with the holder's pid, rather than sharing the
    cluster and stopping it under the first one's feet. A watchdog stopping what a killed owner left
    running is waited for instead: it takes seconds.
    """
    root = data_dir.resolve()
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + _WATCHDOG_WAIT_SECONDS
        while (holder := _take_or_holder(fd)) is not None:
            if holder[1] != WATCHDOG_PURPOSE or time.monotonic() >= deadline:
                raise _busy(root, holder)
            time.sleep(0.1)
        _write_holder(fd, purpose)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def watchdog_data_dir(data_dir: Path, owner: int) -> Iterator[bool]:
    """The data directory for a watchdog about to stop the server (True), unless a `serve` other than
    `owner` (the dead one, whose lock the kernel may not have let go yet when the watchdog reads its pipe's
    end) holds it: that one reused the server, watches it and stops it itself, and the watchdog has nothing
    to do (False; the lock is not taken). Another watchdog is waited for as `exclusive_data_dir` waits for
    one; any other holder (the dying owner included) ends, and is waited for however long it runs.

    Taken while holding `without_joined_users`, never the other way round: commands that joined a `serve`
    hold only the users lock, and every other process waits only for this one, so no two wait for each
    other."""
    root = data_dir.resolve()
    fd = os.open(root / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + _WATCHDOG_WAIT_SECONDS
        while (holder := _take_or_holder(fd)) is not None:
            if holder[1] == "serve" and holder[0] != str(owner):
                yield False
                return
            if holder[1] == WATCHDOG_PURPOSE and time.monotonic() >= deadline:
                raise _busy(root, holder)
            time.sleep(0.1)
        _write_holder(fd, WATCHDOG_PURPOSE)
        yield True
    finally:
        os.close(fd)


def _take_or_holder(fd: int) -> tuple[str, str] | None:
    """Take the data directory's lock on `fd` if it is free (None); else who holds it: (pid, purpose) as
    the holder wrote them, or ("", "unknown") before it has."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        match = _HOLDER.match(os.pread(fd, 100, 0).decode(errors="replace").strip())
        return (match.group(1), match.group(2)) if match else ("", "unknown")


def _write_holder(fd: int, purpose: str) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {purpose}\n".encode(), 0)


def _busy(root: Path, holder: tuple[str, str]) -> DataDirBusyError:
    pid, purpose = holder
    who = f"`bedside {purpose}` (pid {pid})" if pid else "another process"
    return DataDirBusyError(
        f"{root} is in use by {who}. Stop it first, or give this one its own "
        "BEDSIDE_DATA_DIR (or BEDSIDE_DATABASE_URL)."
    )


def _open_users_lock(data_dir: Path) -> int | None:
    """The users lock's file, or None (said on stderr) when another user made it, a joined command run as
    root, say: this process then goes on without it."""
    path = data_dir.resolve() / _USERS_LOCK_NAME
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except PermissionError as exc:
        with contextlib.suppress(OSError):  # a watchdog's stderr may be gone
            print(
                f"bedside: warning: cannot open {path} ({exc.strerror}); going on without waiting for, or being "
                "waited for by, the commands that joined `bedside serve`",
                file=sys.stderr,
                flush=True,
            )
        return None


@contextlib.contextmanager
def joined_data_dir(data_dir: Path) -> Iterator[None]:
    """For as long as the block runs, this process uses the cluster a `serve` holds (a command that joined
    it): that `serve`'s normal stop, or its watchdog if it is killed, waits for the block to end before
    stopping the server."""
    fd = _open_users_lock(data_dir)
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        if fd is not None:
            os.close(fd)


@contextlib.contextmanager
def without_joined_users(data_dir: Path, *, timeout: float | None = None) -> Iterator[bool]:
    """Once no command that joined the cluster uses it any more, and until the block ends: a command
    joining meanwhile waits, and finds the server stopped. True then (also when the lock's file is another
    user's: nothing can be waited for); False, without the lock, when `timeout` seconds passed first."""
    fd = _open_users_lock(data_dir)
    try:
        if fd is None:
            yield True
        elif timeout is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield True
        else:
            deadline = time.monotonic() + timeout
            while not (alone := _try_flock(fd)) and time.monotonic() < deadline:
                time.sleep(0.1)
            yield alone
    finally:
        if fd is not None:
            os.close(fd)


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def data_dir_holder(data_dir: Path) -> str | None:
    """What holds the data directory (`serve`, ...), or None when it is free."""
    path = data_dir.resolve() / _LOCK_NAME
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDWR)
    try:
        holder = _take_or_holder(fd)
        return None if holder is None else holder[1]
    finally:
        os.close(fd)  # and with it the lock, if it was taken
