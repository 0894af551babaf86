"""The migration runner: from empty, idempotent, tamper-evident, serialized, and the start-up check."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
from collections.abc import AsyncIterator

import asyncpg
import pytest
from cryptography.hazmat.primitives import serialization

from service.app import create_app
from service.domain.audit import AuditRecorder
from service.domain.issuers import IssuerService
from service.errors import ConfigurationError, RevokedKeyError
from service.settings import Settings
from service.store.audit import AuditStore
from service.store.db import Database
from service.store.issuers import IssuerStore
from service.store.migrate import MigrationError, load_migrations, migrate, schema_status
from service.store.tenants import TenantStore
from tests.support import TestIssuer


async def _connect(dsn: str) -> asyncpg.Connection:
    return await asyncpg.connect(dsn)


@contextlib.asynccontextmanager
async def _issuers_as_the_app(dsn: str) -> AsyncIterator[IssuerService]:
    """The issuer service over the service's own login: how the operator makes the repair a refusal asks for."""
    db = await Database.connect(dsn, min_size=1, max_size=2)
    try:
        yield IssuerService(db, TenantStore(), IssuerStore(), AuditRecorder(AuditStore(), db), cache_seconds=0)
    finally:
        await db.close()


async def test_migrations_apply_from_an_empty_database(empty_database) -> None:
    conn = await _connect(empty_database.owner)
    try:
        applied = await migrate(conn)
        assert [m.version for m in applied] == list(range(1, len(load_migrations()) + 1))
        tables = {r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")}
        assert {"schema_migrations", "tenants", "issuers", "issuer_keys"} <= tables
        assert (await schema_status(conn)).current
    finally:
        await conn.close()


async def test_running_migrations_again_changes_nothing(empty_database) -> None:
    conn = await _connect(empty_database.owner)
    try:
        await migrate(conn)
        before = await conn.fetch("SELECT version, checksum, applied_at FROM schema_migrations ORDER BY version")
        assert await migrate(conn) == []
        after = await conn.fetch("SELECT version, checksum, applied_at FROM schema_migrations ORDER BY version")
        assert before == after
    finally:
        await conn.close()


async def test_an_applied_migration_that_was_edited_is_refused(database) -> None:
    known = load_migrations()
    edited = [dataclasses.replace(known[0], sql=known[0].sql + "\n-- edited afterwards\n"), *known[1:]]
    conn = await _connect(database.owner)
    try:
        with pytest.raises(MigrationError, match="0001_foundation was changed after it was applied"):
            await migrate(conn, edited)
        status = await schema_status(conn, edited)
        assert not status.current
        assert status.problem is not None
    finally:
        await conn.close()


async def test_a_database_newer_than_the_code_is_refused(database) -> None:
    conn = await _connect(database.owner)
    try:
        await conn.execute("INSERT INTO schema_migrations (version, name, checksum) VALUES (9999, 'future', 'x')")
        with pytest.raises(MigrationError, match="does not know"):
            await migrate(conn)
    finally:
        await conn.close()


async def test_0009_scrubs_the_unkeyed_fingerprints_stored_before_it(empty_database) -> None:
    known = load_migrations()
    conn = await _connect(empty_database.owner)
    try:
        await migrate(conn, known[:8])
        tenant = await conn.fetchval("INSERT INTO tenants (slug) VALUES ('acme') RETURNING id")
        unkeyed = hashlib.sha256(b"('message', 'yes')").digest()
        keyed = b"\x01" + bytes(range(32))
        await conn.executemany(
            "INSERT INTO idempotency_keys (tenant_id, principal, key, request_hash, status, response) "
            "VALUES ($1, 'Patient/1', $2, $3, 201, '{\"message_id\": \"m\"}')",
            [(tenant, "old", unkeyed), (tenant, "new", keyed)],
        )
        endpoint = await conn.fetchval(
            "INSERT INTO webhook_endpoints (tenant_id, id, subscriber, event_types, url, created_by) "
            "VALUES ($1, gen_random_uuid(), 'Practitioner/7', '{message.created}', '\\x00', 'Admin/1') RETURNING id",
            tenant,
        )
        await conn.execute(
            "INSERT INTO inbound_receipts (tenant_id, endpoint_id, webhook_id, body_hash, key_id, thread_id, "
            "message_id) VALUES ($1, $2, 'msg_1', $3, gen_random_uuid(), gen_random_uuid(), gen_random_uuid())",
            tenant,
            endpoint,
            hashlib.sha256(b'{"body": "yes"}').digest(),
        )
        assert [m.name for m in await migrate(conn, known[:9])] == ["keyed_fingerprints"]
        rows = dict(await conn.fetch("SELECT key, request_hash FROM idempotency_keys"))
        # The digest is gone (the replay still works: see tests/unit/test_idempotency_replay.py); a keyed
        # fingerprint, 33 bytes, is left as it was. The same for the signed replies' receipts, which
        # from now on take keyed fingerprints and the marker only.
        assert rows == {"old": b"\x00", "new": keyed}
        assert await conn.fetchval("SELECT body_hash FROM inbound_receipts") == b"\x00"
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("UPDATE inbound_receipts SET body_hash = $1", unkeyed)
    finally:
        await conn.close()


async def test_0015_keeps_every_existing_issuer_at_all_six_roles(empty_database) -> None:
    known = load_migrations()
    conn = await _connect(empty_database.owner)
    try:
        await migrate(conn, known[:14])
        tenant = await conn.fetchval("INSERT INTO tenants (slug) VALUES ('acme') RETURNING id")
        for issuer in ("https://portal.acme.test", "https://added-by-an-admin.acme.test"):
            await conn.execute("INSERT INTO issuers (tenant_id, issuer) VALUES ($1, $2)", tenant, issuer)

        assert [m.name for m in await migrate(conn, known[:15])] == ["issuer_roles"]

        rows = await conn.fetch("SELECT roles, registered_by FROM issuers")
        every = ["patient", "proxy", "physician", "staff", "compliance", "admin"]
        assert [(r["roles"], r["registered_by"]) for r in rows] == [(every, "operator"), (every, "operator")]
        # From now on whoever inserts an issuer says its roles and who registered it: no default says it for them.
        with pytest.raises(asyncpg.NotNullViolationError):
            await conn.execute(
                "INSERT INTO issuers (tenant_id, issuer, registered_by) VALUES ($1, 'x', 'admin')", tenant
            )
        with pytest.raises(asyncpg.NotNullViolationError):
            await conn.execute("INSERT INTO issuers (tenant_id, issuer, roles) VALUES ($1, 'x', '{patient}')", tenant)
        insert = "INSERT INTO issuers (tenant_id, issuer, roles, registered_by) VALUES ($1, 'x', $2, $3)"
        for roles, registered_by in (
            (["doctor"], "admin"),
            ([], "admin"),
            (["patient", None], "admin"),
            ([["patient"], ["proxy"]], "admin"),
            (["patient"], "someone"),
        ):
            with pytest.raises(asyncpg.CheckViolationError):
                await conn.execute(insert, tenant, roles, registered_by)
        await conn.execute(insert, tenant, ["patient", "proxy"], "admin")
    finally:
        await conn.close()


async def test_0016_refuses_a_database_holding_one_key_under_two_names_until_the_operator_revokes_it(
    empty_database,
) -> None:
    """Before 0016 one key could be trusted under several names (kids, issuers) of a tenant, and revoking one
    left it trusted under the others. 0016 makes a key's name unique; on a database that holds such a key it
    revokes nothing (it cannot know which name the portal uses), fails naming each, and runs once the
    operator has revoked them with this version's `bedside issuer revoke`, which revokes every name."""
    known = load_migrations()
    conn = await _connect(empty_database.owner)
    try:
        await migrate(conn, known[:15])
        portal, leaked, fine = (TestIssuer(tenant="acme", issuer="https://portal.acme.test") for _ in range(3))
        tenant = await conn.fetchval("INSERT INTO tenants (slug) VALUES ('acme') RETURNING id")
        issuers = {}
        for issuer in ("https://portal.acme.test", "https://other.acme.test"):
            issuers[issuer] = await conn.fetchval(
                "INSERT INTO issuers (tenant_id, issuer, roles, registered_by) VALUES ($1, $2, '{patient}', "
                "'operator') RETURNING id",
                tenant,
                issuer,
            )
        rows = [  # (issuer, kid, key)
            ("https://portal.acme.test", "portal-key-1", portal),
            ("https://portal.acme.test", "portal-key-1-again", portal),  # two active names
            ("https://other.acme.test", "portal-key-1", portal),  # a third, under another issuer
            ("https://portal.acme.test", "leaked", leaked),
            ("https://portal.acme.test", "shadow", leaked),
            ("https://portal.acme.test", "fine", fine),  # one name: nothing to say
        ]
        for issuer, kid, key in rows:
            await conn.execute(
                "INSERT INTO issuer_keys (tenant_id, issuer_id, kid, algorithm, public_key_pem) "
                "VALUES ($1, $2, $3, 'EdDSA', $4)",
                tenant,
                issuers[issuer],
                kid,
                key.public_pem.decode(),
            )
        # Revoked by the kid the leak was known by, as the code before 0016 did: still trusted as "shadow".
        await conn.execute("UPDATE issuer_keys SET revoked_at = now() WHERE kid = 'leaked'")

        with pytest.raises(MigrationError) as refused:
            await migrate(conn, known[:16])

        assert str(refused.value).splitlines() == [
            "migration 0016_one_name_per_issuer_key refused to run: 2 issuer key(s) are registered under more "
            "than one name (issuer and kid) of their tenant and still trusted under at least one; a key may have "
            "one name only. Nothing was changed",
            "tenant acme: one key under issuer https://portal.acme.test kid leaked (revoked), "
            "issuer https://portal.acme.test kid shadow (active)",
            "tenant acme: one key under issuer https://portal.acme.test kid portal-key-1 (active), "
            "issuer https://portal.acme.test kid portal-key-1-again (active), "
            "issuer https://other.acme.test kid portal-key-1 (active)",
            "Revoke each of these keys with `bedside issuer revoke --tenant T --issuer ISS --kid K` of this "
            "version (any one of its names: it revokes the key under all of them; give the portal a new key "
            "first if it still signs with this one), then run `bedside migrate` again.",
        ]
        assert (await schema_status(conn, known[:16])).applied == 15
        assert await conn.fetchval("SELECT count(*) FROM issuer_keys WHERE revoked_at IS NULL") == 5
    finally:
        await conn.close()

    # The operator does as told, with the service's login, on the schema as it is.
    async with _issuers_as_the_app(empty_database.app) as issuer_service:
        for kid in ("portal-key-1-again", "leaked"):
            await issuer_service.revoke_key("acme", "https://portal.acme.test", kid)

    conn = await _connect(empty_database.owner)
    try:
        assert [m.name for m in await migrate(conn, known[:16])] == ["one_name_per_issuer_key"]
        active = await conn.fetch("SELECT kid FROM issuer_keys WHERE revoked_at IS NULL")
        assert [r["kid"] for r in active] == ["fine"]
    finally:
        await conn.close()


async def test_0017_refuses_a_database_holding_a_trusted_key_in_another_encoding_until_the_operator_revokes_it(
    empty_database,
) -> None:
    """Before 0017 the service's login could store a key in any PEM the key loader reads (CRLF line ends,
    PKCS#1), and the guards that compare PEM text or the DER's fingerprint took it for another key. 0017
    requires the canonical PEM of every trusted key; on a database that holds another, it changes nothing,
    fails naming each (never its key material), and runs once the operator has revoked them."""
    known = load_migrations()
    conn = await _connect(empty_database.owner)
    try:
        await migrate(conn, known[:16])
        portal, odd, fine, gone, other = (
            TestIssuer(tenant="acme", issuer="https://portal.acme.test", algorithm=algorithm)
            for algorithm in ("EdDSA", "RS256", "ES256", "EdDSA", "RS256")
        )
        tenant = await conn.fetchval("INSERT INTO tenants (slug) VALUES ('acme') RETURNING id")
        issuers = {}
        for issuer in ("https://portal.acme.test", "https://other.acme.test"):
            issuers[issuer] = await conn.fetchval(
                "INSERT INTO issuers (tenant_id, issuer, roles, registered_by) VALUES ($1, $2, '{patient}', "
                "'operator') RETURNING id",
                tenant,
                issuer,
            )
        pkcs1 = odd.private_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
        rows = [  # (issuer, kid, algorithm, PEM, revoked)
            ("https://portal.acme.test", "crlf", "EdDSA", portal.public_pem.decode().replace("\n", "\r\n"), False),
            ("https://other.acme.test", "pkcs1", "RS256", pkcs1.decode(), False),
            ("https://portal.acme.test", "fine", "ES256", fine.public_pem.decode(), False),  # canonical
            # Revoked, and so trusted by nobody: left out of the check, nothing to say.
            ("https://portal.acme.test", "gone", "EdDSA", gone.public_pem.decode().replace("\n", "\r\n"), True),
        ]
        for issuer, kid, algorithm, pem, revoked in rows:
            await conn.execute(
                "INSERT INTO issuer_keys (tenant_id, issuer_id, kid, algorithm, public_key_pem, revoked_at) "
                "VALUES ($1, $2, $3, $4, $5, CASE WHEN $6 THEN now() END)",
                tenant,
                issuers[issuer],
                kid,
                algorithm,
                pem,
                revoked,
            )

        with pytest.raises(MigrationError) as refused:
            await migrate(conn, known[:17])

        assert str(refused.value).splitlines() == [
            "migration 0017_canonical_issuer_keys refused to run: 2 trusted issuer key(s) are not stored as the "
            "canonical SubjectPublicKeyInfo PEM that Bedside writes (the service did not write them); a trusted "
            "key may be stored that way only. Nothing was changed",
            "tenant acme: issuer https://other.acme.test kid pkcs1",
            "tenant acme: issuer https://portal.acme.test kid crlf",
            "Revoke each of these keys with `bedside issuer revoke --tenant T --issuer ISS --kid K` (if the portal "
            "still signs with it, first give it a new key with `bedside issuer add`, which stores it "
            "canonically), then run `bedside migrate` again.",
        ]
        assert (await schema_status(conn, known[:17])).applied == 16
        assert await conn.fetchval("SELECT count(*) FROM issuer_keys WHERE revoked_at IS NULL") == 3
    finally:
        await conn.close()

    # The operator does as told, with the service's login, on the schema as it is.
    async with _issuers_as_the_app(empty_database.app) as issuer_service:
        renewed = TestIssuer(tenant="acme", issuer="https://portal.acme.test", kid="renewed")
        await issuer_service.add_key("acme", renewed.issuer, renewed.public_pem, kid=renewed.kid)
        await issuer_service.revoke_key("acme", "https://portal.acme.test", "crlf")
        await issuer_service.revoke_key("acme", "https://other.acme.test", "pkcs1")

    conn = await _connect(empty_database.owner)
    try:
        assert [m.name for m in await migrate(conn, known[:17])] == ["canonical_issuer_keys"]
        active = await conn.fetch("SELECT kid FROM issuer_keys WHERE revoked_at IS NULL ORDER BY kid")
        assert [r["kid"] for r in active] == ["fine", "renewed"]
        # From now on a trusted key goes in canonical, for the owner too.
        with pytest.raises(asyncpg.CheckViolationError, match="issuer_keys_canonical_pem"):
            await conn.execute(
                "INSERT INTO issuer_keys (tenant_id, issuer_id, kid, algorithm, public_key_pem) "
                "VALUES ($1, $2, 'other', 'RS256', $3)",
                tenant,
                issuers["https://portal.acme.test"],
                other.private_key.public_key()
                .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
                .decode(),
            )
    finally:
        await conn.close()


async def test_a_key_revoked_as_0017_asks_is_never_trusted_again_in_its_canonical_pem(empty_database) -> None:
    """0017 asks the operator to revoke each trusted key stored in another encoding (here CRLF line ends),
    and leaves revoked rows out of its check. That revoked key must stay out for good, as every revoked
    key does (0013), also when it comes back as the canonical PEM the service writes: the same key."""
    known = load_migrations()
    portal = TestIssuer(tenant="acme", issuer="https://portal.acme.test", kid="crlf")
    conn = await _connect(empty_database.owner)
    try:
        await migrate(conn, known[:16])
        tenant = await conn.fetchval("INSERT INTO tenants (slug) VALUES ('acme') RETURNING id")
        issuer = await conn.fetchval(
            "INSERT INTO issuers (tenant_id, issuer, roles, registered_by) VALUES ($1, $2, '{patient}', "
            "'operator') RETURNING id",
            tenant,
            portal.issuer,
        )
        await conn.execute(
            "INSERT INTO issuer_keys (tenant_id, issuer_id, kid, algorithm, public_key_pem) "
            "VALUES ($1, $2, 'crlf', 'EdDSA', $3)",
            tenant,
            issuer,
            portal.public_pem.decode().replace("\n", "\r\n"),
        )
        with pytest.raises(MigrationError):
            await migrate(conn, known[:17])
    finally:
        await conn.close()

    async with _issuers_as_the_app(empty_database.app) as issuer_service:
        await issuer_service.revoke_key("acme", portal.issuer, "crlf")  # as the refusal says
        conn = await _connect(empty_database.owner)
        try:
            assert [m.name for m in await migrate(conn, known[:17])] == ["canonical_issuer_keys"]
        finally:
            await conn.close()

        with pytest.raises(RevokedKeyError):
            await issuer_service.add_key("acme", portal.issuer, portal.public_pem, kid="back")
        trusted = await issuer_service.trusted_keys("acme", portal.issuer)
        assert [k.kid for k in trusted.keys] == []


async def test_concurrent_runners_apply_each_migration_once(empty_database) -> None:
    first, second = await _connect(empty_database.owner), await _connect(empty_database.owner)
    try:
        results = await asyncio.gather(migrate(first), migrate(second))
        assert sorted(len(r) for r in results) == [0, len(load_migrations())]
    finally:
        await first.close()
        await second.close()


async def test_the_service_refuses_to_start_on_an_unmigrated_database(empty_database, cluster) -> None:
    # Only the role and grants exist (from another database's migration), none of this one's tables.
    settings = Settings(database_url=empty_database.app, db_pool_min=1, db_pool_max=2)
    app = create_app(settings)
    with pytest.raises(ConfigurationError):
        async with Started(app):
            pass


async def test_the_service_refuses_to_start_against_an_unknown_schema(database) -> None:
    conn = await _connect(database.owner)
    await conn.execute("INSERT INTO schema_migrations (version, name, checksum) VALUES (9999, 'future', 'x')")
    await conn.close()
    app = create_app(Settings(database_url=database.app, db_pool_min=1, db_pool_max=2))
    with pytest.raises(ConfigurationError, match="does not know"):
        async with Started(app):
            pass


async def test_the_service_refuses_to_serve_as_the_table_owner(database) -> None:
    app = create_app(Settings(database_url=database.owner, db_pool_min=1, db_pool_max=2))
    with pytest.raises(ConfigurationError, match="bypasses row-level security"):
        async with Started(app):
            pass


class Started:
    """Run an app's start-up and clean-up without serving it."""

    def __init__(self, app) -> None:
        from aiohttp import web

        self.runner = web.AppRunner(app)

    async def __aenter__(self) -> None:
        await self.runner.setup()

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()
