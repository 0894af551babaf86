"""The `bedside` command against an existing database, as an operator would use it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jwt
import pytest

from tests.support import TestIssuer

BEDSIDE = str(Path(sys.executable).parent / "bedside")


def _run(*args: str, env: dict[str, str] | None = None, module: bool = False) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("BEDSIDE_")}
    command = [sys.executable, "-m", "service", *args] if module else [BEDSIDE, *args]
    return subprocess.run(command, env=base | (env or {}), capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("module", [False, True], ids=["console-script", "python-m-service"])
def test_help_lists_every_command(module: bool) -> None:
    result = _run("--help", module=module)
    assert result.returncode == 0
    for command in ("serve", "migrate", "tenant", "issuer", "token"):
        assert command in result.stdout


def test_migrate_prepares_an_empty_database_and_reports_status(empty_database) -> None:
    status = _run("migrate", "--status", "--database-url", empty_database.owner)
    assert status.returncode == 1
    assert "0 of" in status.stdout

    applied = _run("migrate", "--database-url", empty_database.owner)
    assert applied.returncode == 0, applied.stderr
    assert "applied 0001_foundation" in applied.stdout

    again = _run("migrate", "--database-url", empty_database.owner)
    assert "schema is current" in again.stdout
    assert _run("migrate", "--status", "--database-url", empty_database.owner).returncode == 0


async def test_an_operator_registers_a_portal_whose_tokens_then_work(database, client, tmp_path: Path) -> None:
    created = _run("tenant", "create", "acme", "--database-url", database.app)
    assert created.returncode == 0, created.stderr

    portal = TestIssuer(tenant="acme", issuer="https://portal.acme.test", algorithm="ES256")
    key_file = tmp_path / "portal.pem"
    key_file.write_bytes(portal.public_pem)
    added = _run(
        "issuer",
        "add",
        "--tenant",
        "acme",
        "--issuer",
        portal.issuer,
        "--public-key",
        str(key_file),
        "--database-url",
        database.app,
    )
    assert added.returncode == 0, added.stderr
    portal.kid = added.stdout.strip().rsplit("kid=", 1)[1]

    response = await client.get("/v1/me", headers=portal.auth(role="staff", sub="Practitioner/3"))
    assert response.status == 200
    assert (await response.json())["role"] == "staff"
    assert jwt.get_unverified_header(portal.token())["alg"] == "ES256"


def test_cli_errors_are_one_clear_line_not_a_traceback(database, tmp_path: Path) -> None:
    weak = tmp_path / "weak.pem"
    weak.write_text("-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n")
    result = _run(
        "issuer", "add", "--tenant", "nope", "--issuer", "x", "--public-key", str(weak), "--database-url", database.app
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "public_key" in result.stderr

    taken = _run("tenant", "create", "Bad Name", "--database-url", database.app)
    assert taken.returncode == 1
    assert "Traceback" not in taken.stderr


def test_a_bad_setting_is_named_without_its_value() -> None:
    result = _run("migrate", "--status", env={"BEDSIDE_DATABASE_URL": "mysql://root:hunter2@db/x"})
    assert result.returncode == 2
    assert "BEDSIDE_DATABASE_URL" in result.stderr
    assert "hunter2" not in result.stderr


def test_serve_uses_an_existing_database_given_by_url(database, kek_file: Path, signing_key_file: Path) -> None:
    import signal
    import socket
    import time
    import urllib.request

    from crypto.checkpoint import Ed25519CheckpointSigner
    from crypto.kek_file import LocalKeyFileProvider

    # The operator's keys, provisioned beforehand: outside embedded mode Bedside never invents them.
    LocalKeyFileProvider(kek_file, create=True)
    Ed25519CheckpointSigner.generate("bedside.localhost/audit").save(signing_key_file)

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEDSIDE_")}
    env["BEDSIDE_KEK_FILE"] = str(kek_file)
    env["BEDSIDE_AUDIT_SIGNING_KEY_FILE"] = str(signing_key_file)
    proc = subprocess.Popen(
        [BEDSIDE, "serve", "--database-url", database.app, "--port", str(port), "--host", "127.0.0.1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        assert f"serving on http://127.0.0.1:{port}" in banner
        assert "token" not in banner  # no development issuer outside embedded mode
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
                    assert response.status == 200
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:  # it did not stop when told: it must not outlive the test
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
