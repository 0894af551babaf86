"""Issuer keys at the database: what the application role can do to a revocation, whatever the code says."""

from __future__ import annotations

from uuid import UUID

import asyncpg
import pytest

from service.domain.principal import Role
from tests.conftest import Dsns, Portals, Services
from tests.support import TestIssuer

ISSUER = "https://portal.acme.test"


async def _as_app_in_acme(conn: asyncpg.Connection, statement: str) -> str:
    """Run `statement` as the application role in acme, in a transaction of its own."""
    async with conn.transaction():
        tenant: UUID = await conn.fetchval("SELECT id FROM tenants WHERE slug = 'acme'")
        await conn.execute("SELECT set_config('bedside.tenant_id', $1, true)", str(tenant))
        status: str = await conn.execute(statement)
    return status


@pytest.mark.parametrize(
    "change",
    [
        "UPDATE issuer_keys SET revoked_at = NULL WHERE kid = 'portal-key-1'",
        "UPDATE issuer_keys SET revoked_at = revoked_at - interval '1 day' WHERE kid = 'portal-key-1'",
        "UPDATE issuer_keys SET revoked_at = now() + interval '1 year' WHERE kid = 'portal-key-1'",
    ],
    ids=["cleared", "backdated", "moved-ahead"],
)
async def test_the_app_role_revokes_a_key_but_cannot_undo_or_move_the_revocation(
    portals: Portals, services: Services, database: Dsns, change: str
) -> None:
    conn = await asyncpg.connect(database.app)
    try:
        revoke = "UPDATE issuer_keys SET revoked_at = now() WHERE kid = 'portal-key-1' AND revoked_at IS NULL"
        assert await _as_app_in_acme(conn, revoke) == "UPDATE 1"
        with pytest.raises(asyncpg.exceptions.CheckViolationError):
            await _as_app_in_acme(conn, change)
    finally:
        await conn.close()

    trusted = await services.issuers.trusted_keys("acme", ISSUER)
    assert [k.kid for k in trusted.keys] == []
    assert [k.kid for k in trusted.revoked] == ["portal-key-1"]
    # And the service's own revocation answers as before: the key already was revoked, at that time.
    again = await services.issuers.revoke_key("acme", ISSUER, "portal-key-1")
    assert (again.newly_revoked, again.revoked_at) == (False, trusted.revoked[0].revoked_at)


async def test_the_app_role_cannot_trust_a_revoked_public_key_again_under_a_new_kid(
    portals: Portals, services: Services, database: Dsns
) -> None:
    """The service refuses to register a revoked key again (409 key-revoked); the database does too, for
    whoever holds the application's login: the same public key under another kid or issuer is refused,
    unless it goes in revoked."""
    await services.issuers.revoke_key("acme", ISSUER, "portal-key-1")
    again = (
        "INSERT INTO issuer_keys (tenant_id, issuer_id, kid, algorithm, public_key_pem, revoked_at) "
        "SELECT tenant_id, issuer_id, '{kid}', algorithm, public_key_pem, {revoked} FROM issuer_keys "
        "WHERE kid = 'portal-key-1'"
    )
    conn = await asyncpg.connect(database.app)
    try:
        with pytest.raises(asyncpg.exceptions.CheckViolationError, match="never trusted again"):
            await _as_app_in_acme(conn, again.format(kid="portal-key-1b", revoked="NULL"))
        assert await _as_app_in_acme(conn, again.format(kid="portal-key-1c", revoked="now()")) == "INSERT 0 1"
    finally:
        await conn.close()

    trusted = await services.issuers.trusted_keys("acme", ISSUER)
    assert [k.kid for k in trusted.keys] == []


async def test_the_app_role_may_change_an_issuers_roles_to_known_ones_but_never_who_registered_it(
    portals: Portals, services: Services, database: Dsns
) -> None:
    conn = await asyncpg.connect(database.app)
    try:
        assert await _as_app_in_acme(conn, "UPDATE issuers SET roles = '{patient,proxy}'") == "UPDATE 1"
        with pytest.raises(asyncpg.exceptions.CheckViolationError):
            await _as_app_in_acme(conn, "UPDATE issuers SET roles = '{patient,superuser}'")
        with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
            await _as_app_in_acme(conn, "UPDATE issuers SET registered_by = 'operator'")
        with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
            await _as_app_in_acme(conn, "UPDATE issuers SET issuer = 'https://elsewhere.test'")
    finally:
        await conn.close()

    trusted = await services.issuers.trusted_keys("acme", ISSUER)
    assert trusted.roles == {Role.PATIENT, Role.PROXY}


SECOND_NAME = """
    INSERT INTO issuer_keys (tenant_id, issuer_id, kid, algorithm, public_key_pem)
    SELECT k.tenant_id, i.id, $2, k.algorithm, CASE WHEN $3 THEN replace(k.public_key_pem, E'\\n', E'\\r\\n')
        ELSE k.public_key_pem END
    FROM issuer_keys k JOIN issuers i ON i.tenant_id = k.tenant_id AND i.issuer = $1
    WHERE k.kid = 'portal-key-1'
"""


async def _second_name_in_acme(conn: asyncpg.Connection, issuer: str, kid: str, other_line_ends: bool) -> None:
    """As the application role in acme: portal-key-1's public key again, as `kid` of `issuer`, trusted."""
    async with conn.transaction():
        tenant: UUID = await conn.fetchval("SELECT id FROM tenants WHERE slug = 'acme'")
        await conn.execute("SELECT set_config('bedside.tenant_id', $1, true)", str(tenant))
        await conn.execute(SECOND_NAME, issuer, kid, other_line_ends)


@pytest.mark.parametrize(
    ("issuer", "kid", "other_line_ends"),
    [
        (ISSUER, "portal-key-1b", False),
        ("https://other.acme.test", "portal-key-1", False),
        (ISSUER, "portal-key-1c", True),  # the same key in another PEM layout
    ],
    ids=["another-kid", "another-issuer", "another-pem-layout"],
)
async def test_the_app_role_cannot_trust_one_key_under_a_second_name(
    portals: Portals, services: Services, database: Dsns, issuer: str, kid: str, other_line_ends: bool
) -> None:
    """Migration 0016: an active key has one name (issuer, kid) in its tenant, so revoking that name stops it.
    The service refuses a second one (409 key-in-use); so does the database, comparing the keys' fingerprints,
    for whoever holds the application's login."""
    if issuer != ISSUER:
        await services.issuers.add_key("acme", issuer, TestIssuer(tenant="acme", issuer=issuer).public_pem, kid="k0")
    conn = await asyncpg.connect(database.app)
    try:
        with pytest.raises(asyncpg.exceptions.UniqueViolationError, match="issuer_keys_one_name_per_key"):
            await _second_name_in_acme(conn, issuer, kid, other_line_ends)
    finally:
        await conn.close()

    trusted = await services.issuers.trusted_keys("acme", ISSUER)
    assert [k.kid for k in trusted.keys] == ["portal-key-1"]
