"""`bedside serve` on an existing database (the suite's cluster, so no PostgreSQL of its own to start):
what it checks before serving, in one process and in several."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from crypto.checkpoint import Ed25519CheckpointSigner
from crypto.kek_file import LocalKeyFileProvider
from tests.conftest import Dsns

BEDSIDE = str(Path(sys.executable).parent / "bedside")


def _env(kek_file: Path, signing_key_file: Path, **variables: str) -> dict[str, str]:
    """The operator's keys, provisioned beforehand (outside embedded mode Bedside never invents them),
    and `variables` as BEDSIDE_<NAME>."""
    LocalKeyFileProvider(kek_file, create=True)
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
