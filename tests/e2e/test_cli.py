"""The `bedside` command against an existing database, as an operator would use it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jwt
import pytest

from service.cli import _trust_dev_issuer
from service.domain.issuers import DEV_ISSUER
from service.domain.principal import Role
from service.settings import Settings
from tests.conftest import Portals, Services
from tests.support import TestIssuer, audit_events

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
    trusted, roles = added.stdout.splitlines()
    portal.kid = trusted.rsplit("kid=", 1)[1]
    assert roles == "its tokens may claim the roles patient,proxy,physician,staff,compliance,admin"

    response = await client.get("/v1/me", headers=portal.auth(role="staff", sub="Practitioner/3"))
    assert response.status == 200
    assert (await response.json())["role"] == "staff"
    assert jwt.get_unverified_header(portal.token())["alg"] == "ES256"


async def test_an_operator_revokes_a_portal_key_whose_tokens_then_fail(database, client, tmp_path: Path) -> None:
    assert _run("tenant", "create", "acme", "--database-url", database.app).returncode == 0
    portal = TestIssuer(tenant="acme", issuer="https://portal.acme.test")
    rotated = TestIssuer(tenant="acme", issuer=portal.issuer, kid="portal-key-2")
    for key in (portal, rotated):
        key_file = tmp_path / f"{key.kid}.pem"
        key_file.write_bytes(key.public_pem)
        add = ("issuer", "add", "--tenant", "acme", "--issuer", key.issuer, "--public-key", str(key_file))
        assert _run(*add, "--kid", key.kid, "--database-url", database.app).returncode == 0
    assert (await client.get("/v1/me", headers=portal.auth())).status == 200

    revoke = ("issuer", "revoke", "--tenant", "acme", "--issuer", portal.issuer, "--kid", portal.kid)
    revoked = _run(*revoke, "--database-url", database.app)
    assert revoked.returncode == 0, revoked.stderr
    assert revoked.stdout.startswith(f"revoked key kid=portal-key-1 of issuer {portal.issuer} in tenant acme at ")
    assert "1 other key(s) of the issuer still trusted" in revoked.stdout
    revoked_at = revoked.stdout.splitlines()[0].rsplit(" at ", 1)[1]
    assert (await client.get("/v1/me", headers=portal.auth())).status == 401
    assert (await client.get("/v1/me", headers=rotated.auth())).status == 200

    again = _run(*revoke, "--database-url", database.app)
    assert again.returncode == 0, again.stderr
    assert "was already revoked at" in again.stdout
    # The list shows what was revoked, and when, beside what is still trusted.
    listed = _run("issuer", "list", "--tenant", "acme", "--database-url", database.app)
    assert listed.returncode == 0, listed.stderr
    every = "patient,proxy,physician,staff,compliance,admin"
    assert listed.stdout.splitlines() == [
        f"{portal.issuer}\tportal-key-1\tEdDSA\trevoked {revoked_at}\t{every}\toperator",
        f"{portal.issuer}\tportal-key-2\tEdDSA\tactive\t{every}\toperator",
    ]
    unknown = _run(*revoke[:-1], "no-such-kid", "--database-url", database.app)
    assert unknown.returncode == 1
    assert unknown.stderr == "bedside: this issuer has no key of this kid in the tenant\n"

    events = await audit_events(database.owner, "action = 'issuer:revoke'")
    assert [(e["actor_role"], e["source"], json.loads(e["details"])["already_revoked"]) for e in events] == [
        ("operator", "cli", False),
        ("operator", "cli", True),
    ]


async def test_an_operator_sets_an_issuers_roles_which_take_effect_and_are_audited(
    database, client, tmp_path: Path
) -> None:
    assert _run("tenant", "create", "acme", "--database-url", database.app).returncode == 0
    portal = TestIssuer(tenant="acme", issuer="https://portal.acme.test")
    key_file = tmp_path / "portal.pem"
    key_file.write_bytes(portal.public_pem)
    add = ("issuer", "add", "--tenant", "acme", "--issuer", portal.issuer, "--public-key", str(key_file))
    db = ("--database-url", database.app)
    physician = {"role": "physician", "sub": "Practitioner/7"}

    added = _run(*add, "--kid", portal.kid, "--roles", "proxy, patient", *db)
    assert added.returncode == 0, added.stderr
    assert added.stdout.splitlines()[1] == "its tokens may claim the roles patient,proxy"
    assert (await client.get("/v1/me", headers=portal.auth())).status == 200
    assert (await client.get("/v1/me", headers=portal.auth(**physician))).status == 401

    # The same key again with other roles: `issuer add` never changes an existing issuer's roles.
    other = _run(*add, "--kid", portal.kid, "--roles", "physician", *db)
    assert other.returncode == 1
    assert "bedside issuer roles" in other.stderr
    assert "Traceback" not in other.stderr
    assert _run(*add, "--kid", portal.kid, "--roles", "patient,proxy", *db).returncode == 0  # the same: fine

    roles = ("issuer", "roles", "--tenant", "acme", "--issuer", portal.issuer)
    changed = _run(*roles, "--roles", "physician,staff", *db)
    assert changed.returncode == 0, changed.stderr
    assert changed.stdout.splitlines()[0] == (
        f"issuer {portal.issuer} in tenant acme: roles patient,proxy -> physician,staff"
    )
    assert (await client.get("/v1/me", headers=portal.auth(**physician))).status == 200
    assert (await client.get("/v1/me", headers=portal.auth())).status == 401
    listed = _run("issuer", "list", "--tenant", "acme", *db)
    assert listed.stdout.splitlines() == [f"{portal.issuer}\tportal-key-1\tEdDSA\tactive\tphysician,staff\toperator"]

    unknown_issuer = _run(
        "issuer", "roles", "--tenant", "acme", "--issuer", "https://nope.test", "--roles", "staff", *db
    )
    assert unknown_issuer.returncode == 1
    assert unknown_issuer.stderr == "bedside: this tenant has no such issuer\n"
    unknown_role = _run(*roles, "--roles", "physician,doctor", *db)
    assert unknown_role.returncode == 2
    assert "unknown role 'doctor'" in unknown_role.stderr
    assert "patient, proxy, physician, staff, compliance, admin" in unknown_role.stderr
    assert _run(*roles, "--roles", "", *db).returncode == 2

    events = await audit_events(database.owner, "action = 'issuer:roles'")
    assert [
        (e["actor_role"], e["source"], e["outcome"], e["resource_id"], json.loads(e["details"])) for e in events
    ] == [
        (
            "operator",
            "cli",
            "success",
            portal.issuer,
            {"old_roles": ["patient", "proxy"], "new_roles": ["physician", "staff"]},
        )
    ]
    created, refused = await audit_events(database.owner, "action = 'issuer:add'")
    assert (created["outcome"], json.loads(created["details"])) == (
        "success",
        {"kid": "portal-key-1", "new_issuer": True, "roles": ["patient", "proxy"], "registered_by": "operator"},
    )
    assert (refused["actor_role"], refused["outcome"], json.loads(refused["details"])) == (
        "operator",
        "denied",
        {"kid": "portal-key-1", "reason": "roles-of-existing-issuer", "roles": ["physician"]},
    )


class TestAnIssuerATenantAdminRegistered:
    """An admin registers an issuer name first (within BEDSIDE_ADMIN_ISSUER_ROLES), say the one the operator
    meant for a second portal. The issuer's roles go to every key of it, the admin's included: the operator
    who adds theirs with other roles is told a tenant admin registered it, and `issuer roles` gives it roles
    beyond what admins may give only when the operator says they trust it."""

    @pytest.fixture
    def settings(self, settings: Settings) -> Settings:
        return settings.model_copy(update={"admin_issuer_roles": frozenset({Role.PATIENT, Role.PROXY})})

    async def test_the_operator_is_told_and_widens_its_roles_past_the_admins_cap_only_when_asked(
        self, database, client, portals: Portals, tmp_path: Path
    ) -> None:
        squatted = "https://ehr2.acme.test"
        admins = TestIssuer(tenant="acme", issuer=squatted, kid="admins-key")
        body = {"issuer": squatted, "public_key_pem": admins.public_pem.decode(), "kid": admins.kid}
        registered = await client.post(
            "/v1/admin/issuers", json=body, headers=portals.acme.auth(role="admin", sub="Practitioner/admin1")
        )
        assert registered.status == 201, await registered.text()
        key_file = tmp_path / "ehr2.pem"
        key_file.write_bytes(TestIssuer(tenant="acme", issuer=squatted).public_pem)
        db, env = ("--database-url", database.app), {"BEDSIDE_ADMIN_ISSUER_ROLES": "patient,proxy"}
        physician = {"role": "physician", "sub": "Practitioner/7"}

        add = ("issuer", "add", "--tenant", "acme", "--issuer", squatted, "--public-key", str(key_file))
        added = _run(*add, "--kid", "ehr2-1", "--roles", ",".join(r.value for r in Role), *db, env=env)
        assert added.returncode == 1
        assert added.stderr.startswith(
            "bedside: a tenant admin registered this issuer, with the roles patient,proxy; "
            "its keys: admins-key (active). "
        )
        assert "--trust-admin-registered" in added.stderr

        # Following the advice to use `issuer roles` no longer widens the admin's own key past the cap unasked.
        roles = ("issuer", "roles", "--tenant", "acme", "--issuer", squatted)
        refused = _run(*roles, "--roles", "patient,proxy,physician", *db, env=env)
        assert refused.returncode == 1
        assert "BEDSIDE_ADMIN_ISSUER_ROLES: patient,proxy" in refused.stderr
        assert "--trust-admin-registered" in refused.stderr
        assert (await client.get("/v1/me", headers=admins.auth(**physician))).status == 401
        narrowed = _run(*roles, "--roles", "patient", *db, env=env)  # within the cap: as for any issuer
        assert narrowed.returncode == 0, narrowed.stderr

        trusted = _run(*roles, "--roles", "patient,physician", "--trust-admin-registered", *db, env=env)

        assert trusted.returncode == 0, trusted.stderr
        assert (await client.get("/v1/me", headers=admins.auth(**physician))).status == 200  # as asked
        events = await audit_events(database.owner, "action = 'issuer:roles'")
        assert [(e["actor_role"], e["outcome"], json.loads(e["details"])) for e in events] == [
            (
                "operator",
                "denied",
                {
                    "old_roles": ["patient", "proxy"],
                    "new_roles": ["patient", "proxy", "physician"],
                    "registered_by": "admin",
                    "reason": "roles-beyond-admin-roles",
                    "beyond_admin_roles": ["physician"],
                },
            ),
            (
                "operator",
                "success",
                {"old_roles": ["patient", "proxy"], "new_roles": ["patient"], "registered_by": "admin"},
            ),
            (
                "operator",
                "success",
                {
                    "old_roles": ["patient"],
                    "new_roles": ["patient", "physician"],
                    "registered_by": "admin",
                    "beyond_admin_roles": ["physician"],
                    "trust_admin_registered": True,
                },
            ),
        ]


async def test_a_revoked_development_key_stays_revoked_when_serve_trusts_it_again(
    services: Services, tmp_path: Path
) -> None:
    # Embedded `serve` trusts the development issuer in every tenant each time it starts: a key the operator
    # revoked must stay revoked, and must not stop the server from starting.
    settings = Settings(data_dir=tmp_path)
    await services.tenants.create("demo")
    await _trust_dev_issuer(settings, services.issuers, "demo")
    (key,) = await services.issuers.list_keys("demo")
    revoked = await services.issuers.revoke_key("demo", DEV_ISSUER, key.kid)

    await _trust_dev_issuer(settings, services.issuers, "demo")
    assert [(k.kid, k.revoked_at) for k in await services.issuers.list_keys("demo")] == [(key.kid, revoked.revoked_at)]


async def test_the_operator_cannot_register_an_issuer_in_the_services_own_namespace(
    database, services: Services, tmp_path: Path
) -> None:
    # Only embedded mode's own start-up registers the development issuer (test above); `issuer add` refuses.
    assert _run("tenant", "create", "acme", "--database-url", database.app).returncode == 0
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(TestIssuer(tenant="acme", issuer=DEV_ISSUER).public_pem)
    for name in (DEV_ISSUER, "urn:bedside:webhook:00000000-0000-0000-0000-000000000007"):
        add = ("issuer", "add", "--tenant", "acme", "--issuer", name, "--public-key", str(key_file))
        refused = _run(*add, "--database-url", database.app)
        assert refused.returncode == 1
        assert refused.stderr == (
            "bedside: This issuer name is reserved: issuer: names starting urn:bedside: are the service's own\n"
        )
    assert await services.issuers.list_keys("acme") == []


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
