"""`bedside keys ...` as an operator runs it: status, rotate with progress, retire, shred; file and HSM."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import Services

BEDSIDE = str(Path(sys.executable).parent / "bedside")


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("BEDSIDE_")}
    return subprocess.run(
        [BEDSIDE, *args],
        env=base | env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        stdin=subprocess.DEVNULL,
    )


async def _seal(services: Services, patients: list[str]) -> None:
    tenant = await services.tenants.create("acme")
    for patient in patients:
        async with services.db.transaction(tenant.id) as tx:
            await services.keyring.seal_for(tx, patient, b"secret", {"column": "test.body"})


def test_a_missing_key_file_is_an_error_not_a_new_key(database, tmp_path: Path) -> None:
    env = {"BEDSIDE_DATABASE_URL": database.app, "BEDSIDE_KEK_FILE": str(tmp_path / "absent.json")}
    result = _run("keys", "status", env=env)
    assert result.returncode == 1
    assert "does not exist" in result.stderr
    assert not (tmp_path / "absent.json").exists()


async def test_operator_rotates_retires_and_shreds(database, services: Services, kek_file: Path) -> None:
    await _seal(services, ["Patient/1", "Patient/2", "Patient/3"])
    env = {"BEDSIDE_DATABASE_URL": database.app, "BEDSIDE_KEK_FILE": str(kek_file)}

    status = _run("keys", "status", env=env)
    assert status.returncode == 0, status.stderr
    assert "primary version 1" in status.stdout
    owner = await asyncpg.connect(database.owner)
    try:  # every key operation of the command line is an audit event too
        assert await owner.fetchval("SELECT count(*) FROM audit_outbox WHERE action = 'key:status'") == 1
    finally:
        await owner.close()
    assert "version 1: 3 data key wrap(s)" in status.stdout

    rotated = _run("keys", "rotate", env=env)
    assert rotated.returncode == 0, rotated.stderr
    assert "KEK version 2 is now primary" in rotated.stdout
    assert "rewrapped 3 data key wrap(s)" in rotated.stdout
    assert "rewrapping: 3/3 (100%)" in rotated.stderr  # the progress bar, as plain lines off a terminal

    retired = _run("keys", "rotate", "--resume", "--retire-old", env=env)
    assert retired.returncode == 0, retired.stderr
    assert "rewrapped 0" in retired.stdout
    assert "retired KEK version 1" in retired.stdout
    assert "usable versions 2" in _run("keys", "status", env=env).stdout

    unconfirmed = _run("keys", "shred", "--tenant", "acme", "--patient", "Patient/1", env=env)
    assert unconfirmed.returncode == 1
    assert "--confirm" in unconfirmed.stderr
    shredded = _run("keys", "shred", "--tenant", "acme", "--patient", "Patient/1", "--confirm", "Patient/1", env=env)
    assert shredded.returncode == 0, shredded.stderr
    assert "can no longer be decrypted" in shredded.stdout
    assert "2 live, 1 shredded" in _run("keys", "status", env=env).stdout


def test_keys_on_an_hsm_token(database, softhsm_env: dict[str, str]) -> None:
    env = softhsm_env | {"BEDSIDE_DATABASE_URL": database.app}
    first = _run("keys", "status", env=env)
    assert first.returncode == 0, first.stderr
    assert "primary version 1" in first.stdout
    rotated = _run("keys", "rotate", env=env)
    assert rotated.returncode == 0, rotated.stderr
    assert "KEK version 2 is now primary" in rotated.stdout
    assert "KEK version 3 is now primary" in _run("keys", "rotate", env=env).stdout  # the token keeps state
    assert "primary version 3" in _run("keys", "status", env=env).stdout
    wrong_pin = _run("keys", "status", env=env | {"BEDSIDE_PKCS11_PIN": "nope"})
    assert wrong_pin.returncode == 1
    assert "nope" not in wrong_pin.stderr


async def test_content_sealed_through_an_hsm_survives_rotation_by_the_cli(
    database, services: Services, softhsm_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import pkcs11

    from crypto.dek_cache import DataKeyCache
    from crypto.kek_pkcs11 import Pkcs11KekProvider
    from service.domain.keyring import KekClient, PatientKeyring
    from service.store.data_keys import DataKeyStore

    monkeypatch.setenv("SOFTHSM2_CONF", softhsm_env["SOFTHSM2_CONF"])
    library = softhsm_env["BEDSIDE_PKCS11_LIBRARY"]

    def hsm_keyring() -> tuple[KekClient, PatientKeyring]:
        pkcs11.lib(library).reinitialize()  # SoftHSM2 reads SOFTHSM2_CONF when initialized
        provider = Pkcs11KekProvider(library_path=library, token_label="bedside-cli", user_pin="user-1234")
        kek = KekClient(provider)
        return kek, PatientKeyring(DataKeyStore(), kek, DataKeyCache())

    tenant = await services.tenants.create("acme")
    kek, keyring = hsm_keyring()
    try:
        async with services.db.transaction(tenant.id) as tx:
            sealed = await keyring.seal_for(tx, "Patient/1", b"sealed on the token", {"column": "test.body"})
    finally:
        kek.close()
        kek.provider.close()  # type: ignore[attr-defined]

    rotated = _run("keys", "rotate", "--retire-old", env=softhsm_env | {"BEDSIDE_DATABASE_URL": database.app})
    assert rotated.returncode == 0, rotated.stderr
    assert "rewrapped 1" in rotated.stdout
    assert "retired KEK version 1" in rotated.stdout

    kek, keyring = hsm_keyring()
    try:
        async with services.db.transaction(tenant.id) as tx:
            assert await keyring.open(tx, sealed, {"column": "test.body"}) == b"sealed on the token"
            wraps = await tx.conn.fetch("SELECT kek_version FROM data_key_wraps")
        assert [w["kek_version"] for w in wraps] == [2]
    finally:
        kek.close()
        kek.provider.close()  # type: ignore[attr-defined]
        pkcs11.lib(library).finalize()
