"""`bedside audit verify|checkpoint|key` as an operator runs them against a live log."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import asyncpg

from crypto.checkpoint import verify_checkpoint
from tests.conftest import Portals

BEDSIDE = str(Path(sys.executable).parent / "bedside")


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("BEDSIDE_")}
    return subprocess.run([BEDSIDE, *args], env=base | env, capture_output=True, text=True, timeout=120, check=False)


async def _some_events(client, portals: Portals) -> None:
    for _ in range(30):  # denied logins: each one an audit event of acme's
        await client.get("/v1/me", headers={"Authorization": f"Bearer {portals.acme.token(exp=1, iat=0)}"})
    for _ in range(200):
        if (await (await client.get("/readyz")).json())["audit_backlog"] == 0:
            return
        await asyncio.sleep(0.05)


async def test_operator_verifies_the_log_and_publishes_its_checkpoint(
    client, portals: Portals, database, signing_key_file: Path, tmp_path: Path
) -> None:
    await _some_events(client, portals)
    env = {
        "BEDSIDE_DATABASE_URL": database.owner,  # verify reads every tenant's leaves: the owner
        "BEDSIDE_AUDIT_SIGNING_KEY_FILE": str(signing_key_file),
    }
    key = _run("audit", "key", env=env)
    assert key.returncode == 0, key.stderr
    vkey = key.stdout.strip()
    assert vkey.startswith("bedside.localhost/audit+")

    verified = _run("audit", "verify", env=env)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "ok:" in verified.stdout

    published = _run("audit", "checkpoint", env=env)
    assert published.returncode == 0, published.stderr
    checkpoint = verify_checkpoint(published.stdout, vkey)
    assert checkpoint.size >= 30
    (tmp_path / "published.note").write_text(published.stdout)

    owner = await asyncpg.connect(database.owner)
    try:
        await owner.execute("ALTER TABLE audit_leaves DISABLE TRIGGER ALL")
        await owner.execute("UPDATE audit_leaves SET outcome = 'success' WHERE seq = 11")
    finally:
        await owner.close()
    (tmp_path / "log.vkey").write_text(vkey)
    failed = _run(
        "audit",
        "verify",
        "--public-key",
        str(tmp_path / "log.vkey"),
        "--trusted-checkpoint",
        str(tmp_path / "published.note"),
        env=env,
    )
    assert failed.returncode == 1
    assert "FAILED at index 11" in failed.stdout
