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
    for _ in range(20):  # denied logins, within one address's budget: each one an audit event of acme's
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
    assert checkpoint.size >= 20
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


async def test_a_deployment_with_its_keys_on_an_hsm(database, portals: Portals, softhsm_env: dict[str, str]) -> None:
    """KEKs and the checkpoint signing key both on PKCS#11 tokens: serve, log, publish, verify."""
    import signal
    import socket
    import urllib.error
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = softhsm_env | {
        "BEDSIDE_AUDIT_SIGNER": "pkcs11",
        "BEDSIDE_AUDIT_SIGNING_KEY_CREATE": "true",  # a new log: make the key pair on the token
        "BEDSIDE_AUDIT_BATCH_INTERVAL_SECONDS": "0.05",
    }
    base = {k: v for k, v in os.environ.items() if not k.startswith("BEDSIDE_")}
    proc = await asyncio.to_thread(
        subprocess.Popen,
        [BEDSIDE, "serve", "--database-url", database.app, "--port", str(port)],
        env=base | env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert "serving on" in await asyncio.to_thread(proc.stdout.readline)

        def refused_login() -> int:
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/me",
                headers={"Authorization": f"Bearer {portals.acme.token(exp=1, iat=0)}"},
            )
            try:
                urllib.request.urlopen(request, timeout=5)
            except urllib.error.HTTPError as exc:
                return exc.code
            return 200

        for _ in range(5):
            assert await asyncio.to_thread(refused_login) == 401
        await asyncio.sleep(1.0)  # several sequencer rounds
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.to_thread(proc.wait, 30)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    assert proc.returncode == 0

    hsm_env = env | {"BEDSIDE_AUDIT_SIGNING_KEY_CREATE": "false"}
    key = await asyncio.to_thread(_run, "audit", "key", env=hsm_env)
    assert key.returncode == 0, key.stderr
    vkey = key.stdout.strip()
    published = await asyncio.to_thread(
        _run, "audit", "checkpoint", env=hsm_env | {"BEDSIDE_DATABASE_URL": database.owner}
    )
    assert published.returncode == 0, published.stderr
    assert verify_checkpoint(published.stdout, vkey).size >= 5
    verified = await asyncio.to_thread(_run, "audit", "verify", env=hsm_env | {"BEDSIDE_DATABASE_URL": database.owner})
    assert verified.returncode == 0, verified.stdout + verified.stderr
