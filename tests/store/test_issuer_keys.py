"""Issuer keys at the database: what the application role can do to a revocation, whatever the code says."""

from __future__ import annotations

import base64
from uuid import UUID

import asyncpg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from crypto.issuer_keys import load_issuer_public_key
from service.domain.principal import Role
from tests.conftest import Dsns, Portals, Services
from tests.support import TestIssuer

ISSUER = "https://portal.acme.test"
ONE_NAME = "issuer_keys_one_name_per_key"  # migration 0016's index
CANONICAL = "issuer_keys_canonical_pem"  # migration 0017's check


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
    ("issuer", "kid", "other_line_ends", "refusal"),
    [
        (ISSUER, "portal-key-1b", False, asyncpg.exceptions.UniqueViolationError),
        ("https://other.acme.test", "portal-key-1", False, asyncpg.exceptions.UniqueViolationError),
        # The same key in another PEM layout: not even stored (migration 0017), let alone under a second name.
        (ISSUER, "portal-key-1c", True, asyncpg.exceptions.CheckViolationError),
    ],
    ids=["another-kid", "another-issuer", "another-pem-layout"],
)
async def test_the_app_role_cannot_trust_one_key_under_a_second_name(
    portals: Portals,
    services: Services,
    database: Dsns,
    issuer: str,
    kid: str,
    other_line_ends: bool,
    refusal: type[asyncpg.PostgresError],
) -> None:
    """Migration 0016: an active key has one name (issuer, kid) in its tenant, so revoking that name stops it.
    The service refuses a second one (409 key-in-use); so does the database, comparing the keys' fingerprints,
    for whoever holds the application's login."""
    if issuer != ISSUER:
        await services.issuers.add_key("acme", issuer, TestIssuer(tenant="acme", issuer=issuer).public_pem, kid="k0")
    conn = await asyncpg.connect(database.app)
    try:
        name = {asyncpg.exceptions.UniqueViolationError: ONE_NAME, asyncpg.exceptions.CheckViolationError: CANONICAL}
        with pytest.raises(refusal, match=name[refusal]):
            await _second_name_in_acme(conn, issuer, kid, other_line_ends)
    finally:
        await conn.close()

    trusted = await services.issuers.trusted_keys("acme", ISSUER)
    assert [k.kid for k in trusted.keys] == ["portal-key-1"]


async def test_the_app_role_cannot_trust_a_revoked_public_key_again_in_another_pem_layout(
    portals: Portals, services: Services, database: Dsns
) -> None:
    """Migration 0013's trigger (a revoked key is never trusted again) and the store compare PEM text, which
    one key could be written as in several layouts: the revoked key came back with CRLF line ends. Since
    migration 0017 an active key is stored in the canonical layout only, so equal keys are equal text, and
    the revoked key in another layout is refused as not canonical."""
    await services.issuers.revoke_key("acme", ISSUER, "portal-key-1")
    again = (
        "INSERT INTO issuer_keys (tenant_id, issuer_id, kid, algorithm, public_key_pem) "
        "SELECT tenant_id, issuer_id, 'portal-key-1-crlf', algorithm, replace(public_key_pem, E'\\n', E'\\r\\n') "
        "FROM issuer_keys WHERE kid = 'portal-key-1'"
    )
    conn = await asyncpg.connect(database.app)
    try:
        with pytest.raises(asyncpg.exceptions.CheckViolationError, match=CANONICAL):
            await _as_app_in_acme(conn, again)
    finally:
        await conn.close()

    trusted = await services.issuers.trusted_keys("acme", ISSUER)
    assert [k.kid for k in trusted.keys] == []
    assert [k.kid for k in trusted.revoked] == ["portal-key-1"]


async def _in_acme(conn: asyncpg.Connection, statement: str, *args: object) -> None:
    """Run `statement` with `args` as the application role in acme, in a transaction of its own."""
    async with conn.transaction():
        tenant: UUID = await conn.fetchval("SELECT id FROM tenants WHERE slug = 'acme'")
        await conn.execute("SELECT set_config('bedside.tenant_id', $1, true)", str(tenant))
        await conn.execute(statement, *args)


def _other_encoding(key: TestIssuer) -> str:
    """The same public key as another PEM that the service's key loader reads as it: RSA as PKCS#1
    (`BEGIN RSA PUBLIC KEY`), P-256 with its point compressed."""
    public = key.private_key.public_key()
    if key.algorithm == "RS256":
        return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1).decode()
    point = public.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
    der = bytes.fromhex("3039301306072a8648ce3d020106082a8648ce3d030107032200") + point
    body = base64.encodebytes(der).decode().replace("\n", "")
    return f"-----BEGIN PUBLIC KEY-----\n{body}\n-----END PUBLIC KEY-----\n"


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
async def test_the_app_role_cannot_trust_one_key_under_a_second_name_in_another_encoding(
    portals: Portals, services: Services, database: Dsns, algorithm: str
) -> None:
    """0016's index compares the SHA-256 of the DER the PEM holds; one RSA or P-256 key has more than one
    DER (PKCS#1 or SubjectPublicKeyInfo; compressed or uncompressed point), all of which the service loads
    and verifies tokens with. Since migration 0017 an active key is stored as the canonical
    SubjectPublicKeyInfo only, so one key has one fingerprint, and the second name in another encoding is
    refused as not canonical."""
    portal = TestIssuer(tenant="acme", issuer="https://ehr2.acme.test", algorithm=algorithm, kid="ehr2-1")
    await services.issuers.add_key("acme", portal.issuer, portal.public_pem, kid=portal.kid)
    assert load_issuer_public_key(_other_encoding(portal).encode()).pem == portal.public_pem.decode()
    second = (
        "INSERT INTO issuer_keys (tenant_id, issuer_id, kid, algorithm, public_key_pem) "
        "SELECT tenant_id, issuer_id, 'ehr2-1b', algorithm, $1 FROM issuer_keys WHERE kid = 'ehr2-1'"
    )
    conn = await asyncpg.connect(database.app)
    try:
        with pytest.raises(asyncpg.exceptions.CheckViolationError, match=CANONICAL):
            await _in_acme(conn, second, _other_encoding(portal))
    finally:
        await conn.close()

    trusted = await services.issuers.trusted_keys("acme", portal.issuer)
    assert [k.kid for k in trusted.keys] == ["ehr2-1"]


def _pem(der: bytes, *, width: int = 64, line_end: str = "\n") -> str:
    body = base64.b64encode(der).decode()
    lines = [body[i : i + width] for i in range(0, len(body), width)]
    return line_end.join(["-----BEGIN PUBLIC KEY-----", *lines, "-----END PUBLIC KEY-----", ""])


def _spki(algorithm_identifier: str, key: bytes) -> bytes:
    """A SubjectPublicKeyInfo (long-form DER lengths, as RSA keys need) of `key` under that AlgorithmIdentifier."""

    def tlv(tag: int, content: bytes) -> bytes:
        return bytes([tag, 0x82]) + len(content).to_bytes(2, "big") + content

    return tlv(0x30, bytes.fromhex(algorithm_identifier) + tlv(0x03, b"\x00" + key))


def _encodings_the_loader_reads(key: TestIssuer) -> dict[str, str]:
    """The key's public half as PEMs other than the canonical one, each of which the service's key loader reads
    as that very key."""
    public = key.private_key.public_key()
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    canonical = key.public_pem.decode()
    found = {
        "crlf": canonical.replace("\n", "\r\n"),
        "no-final-line-end": canonical.rstrip("\n"),
        "lines-of-48": _pem(der, width=48),
        "space-at-a-line-end": canonical.replace("-----\n", "----- \n", 1),
        "text-before": "portal key\n" + canonical,
        "blank-line-before": "\n" + canonical,
        "blank-line-after": canonical + "\n",
    }
    if key.algorithm == "RS256":
        pkcs1 = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
        found["pkcs1"] = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1).decode()
        found["no-null-parameters"] = _pem(_spki("300b06092a864886f70d010101", pkcs1))
        found["rsassa-pss"] = _pem(_spki("300b06092a864886f70d01010a", pkcs1))
    if key.algorithm == "ES256":
        point = public.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
        found["compressed-point"] = _pem(bytes.fromhex("3039301306072a8648ce3d020106082a8648ce3d030107032200") + point)
        hybrid = bytearray(der)
        hybrid[-65] = 6 + (public.public_numbers().y & 1)  # 04 x y -> 06|07 x y
        found["hybrid-point"] = _pem(bytes(hybrid))
    return found


@pytest.mark.parametrize(
    ("algorithm", "rsa_bits"),
    [("EdDSA", None), ("ES256", None), ("RS256", 2048), ("RS256", 4096)],
    ids=["EdDSA", "ES256", "RS256-2048", "RS256-4096"],
)
async def test_the_app_role_stores_a_trusted_key_only_as_the_canonical_pem_the_service_writes(
    portals: Portals, services: Services, database: Dsns, algorithm: str, rsa_bits: int | None
) -> None:
    """Migration 0017: an active issuer key is stored as the canonical SubjectPublicKeyInfo PEM only (LF line
    ends, lines of 64, EC point uncompressed, RSA as rsaEncryption with NULL parameters), so that equal text
    and equal fingerprints mean the same key. Every other encoding the service's loader reads as that key is
    refused for the application's login; the PEM the service writes of a key of each algorithm goes in."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits) if rsa_bits else None
    portal = TestIssuer(tenant="acme", issuer=ISSUER, algorithm=algorithm, kid="new", private_key=private)
    insert = (
        "INSERT INTO issuer_keys (tenant_id, issuer_id, kid, algorithm, public_key_pem) "
        "SELECT tenant_id, id, $1, $2, $3 FROM issuers WHERE issuer = $4"
    )
    conn = await asyncpg.connect(database.app)
    try:
        for name, pem in _encodings_the_loader_reads(portal).items():
            assert load_issuer_public_key(pem.encode()).pem == portal.public_pem.decode(), name
            with pytest.raises(asyncpg.exceptions.CheckViolationError, match=CANONICAL):
                await _in_acme(conn, insert, f"new-{name}", algorithm, pem, ISSUER)
        # The canonical PEM under another algorithm than its key's is no more canonical.
        for other in {"EdDSA", "ES256", "RS256"} - {algorithm}:
            with pytest.raises(asyncpg.exceptions.CheckViolationError, match=CANONICAL):
                await _in_acme(conn, insert, f"new-as-{other}", other, portal.public_pem.decode(), ISSUER)
    finally:
        await conn.close()

    await services.issuers.add_key("acme", ISSUER, portal.public_pem, kid=portal.kid)
    trusted = await services.issuers.trusted_keys("acme", ISSUER)
    assert [(k.kid, k.algorithm) for k in trusted.keys] == [("portal-key-1", "EdDSA"), ("new", algorithm)]
