"""`bedside serve` on an existing database (the suite's cluster, so no PostgreSQL of its own to start):
what it checks before serving, in one process and in several."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from crypto.checkpoint import Ed25519CheckpointSigner
from crypto.kek_file import LocalKeyFileProvider
from service.settings import Settings
from tests.api.messaging_helpers import consent, thread
from tests.api.webhook_helpers import Receiver, register
from tests.conftest import Dsns, Portals

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


@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_server_that_cannot_start_says_why_in_one_line(
    empty_database: Dsns, kek_file: Path, signing_key_file: Path, processes: str
) -> None:
    # A database nobody migrated: serve itself connects to it, then each server process refuses it.
    env = _env(kek_file, signing_key_file, processes=processes, port="0")

    result = subprocess.run(
        [BEDSIDE, "serve", "--database-url", empty_database.app], env=env, capture_output=True, text=True, timeout=60
    )

    # As one process says it: one line, no traceback, exit status 1.
    assert result.returncode == 1
    assert result.stdout == ""
    [said] = result.stderr.splitlines()
    assert re.fullmatch(r"bedside: the database schema is at migration 0 of \d+: run `bedside migrate` first", said)


@pytest.mark.parametrize("processes", ["1", "2"])
def test_port_zero_serves_on_a_free_port_and_says_which(
    database: Dsns, kek_file: Path, signing_key_file: Path, processes: str
) -> None:
    env = _env(kek_file, signing_key_file, processes=processes, port="0")
    serve = subprocess.Popen(
        [BEDSIDE, "serve", "--database-url", database.app], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert serve.stdout is not None
        banner = serve.stdout.readline()
        found = re.search(r"serving on http://127\.0\.0\.1:(\d+)$", banner)
        assert found, banner
        port = int(found.group(1))
        assert port != 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as response:
            assert response.status == 200
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            assert serve.wait(timeout=60) == 0
        finally:
            if serve.stdout is not None:
                serve.stdout.close()


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The app that arranges a test delivers no webhooks itself: the `bedside serve` under test does."""
    return settings.model_copy(update={"webhook_worker": False, "webhook_allow_http_loopback": True})


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    await receiver.start()
    yield receiver
    await receiver.stop()


@pytest.mark.parametrize("processes", ["1", "2"])
async def test_background_work_is_audited_under_the_serve_run_in_every_process_count(
    client: Any,
    portals: Portals,
    receiver: Receiver,
    database: Dsns,
    kek_file: Path,
    signing_key_file: Path,
    processes: str,
) -> None:
    """What the servers' background tasks record (here the webhook worker's deliveries) carries the
    request id and source of the `bedside serve` run that did it, whether one process serves or several."""
    await register(client, portals, receiver.url)
    await consent(client, portals)
    await thread(client, portals, message="first")  # thread.created and message.created, not yet delivered
    env = _env(
        kek_file,
        signing_key_file,
        processes=processes,
        port="0",
        webhook_allow_http_loopback="true",
        webhook_poll_interval_seconds="0.05",
    )
    serve = await asyncio.create_subprocess_exec(
        BEDSIDE,
        "serve",
        "--database-url",
        database.app,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        recorded = await _deliveries_audited(database, count=2, within=60)
    finally:
        serve.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(serve.wait(), 60) == 0

    assert {row["source"] for row in recorded} == {"cli"}
    [run] = {row["request_id"] for row in recorded}  # one run, one id, in every process
    assert re.fullmatch(r"cli-[0-9a-f]{32}", run)


async def _deliveries_audited(database: Dsns, *, count: int, within: float) -> list[asyncpg.Record]:
    """The `webhook:deliver` audit events, once there are `count` of them; fails after `within` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    conn = await asyncpg.connect(database.owner)
    try:
        while True:
            recorded = await conn.fetch(
                "SELECT request_id, source FROM audit_outbox WHERE action = 'webhook:deliver'"
                " UNION ALL SELECT request_id, source FROM audit_leaves WHERE action = 'webhook:deliver'"
            )
            if len(recorded) >= count:
                return recorded
            assert asyncio.get_running_loop().time() < deadline, f"{len(recorded)} of {count} deliveries audited"
            await asyncio.sleep(0.1)
    finally:
        await conn.close()
