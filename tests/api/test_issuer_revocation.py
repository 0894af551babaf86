"""Revoking an issuer key: its tokens, cached or fresh, are refused at once by the process that revoked it;
the issuer's other keys go on working; the revocation is the admin's audited act, and a revoked key is
never trusted again. The app runs with both caches on, as in production, so that only the revocation can
end a token early."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import jwt
import pytest

from service.domain.audit import decode_entry
from service.errors import KeyInUseError
from service.settings import Settings
from tests.conftest import Dsns, Portals, Services
from tests.support import TestIssuer, audit_events

REVOKE = "/v1/admin/issuers/revoke"
ISSUER = "https://portal.acme.test"
ADMIN = {"role": "admin", "sub": "Practitioner/admin"}


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Issuer keys, and the tokens they verified, cached for five minutes in this process."""
    return settings.model_copy(update={"issuer_cache_seconds": 300})


@pytest.fixture
async def rotated(portals: Portals, services: Services) -> TestIssuer:
    """A second key of acme's portal, as during a rotation."""
    key = TestIssuer(tenant="acme", issuer=ISSUER, kid="portal-key-2")
    await services.issuers.add_key("acme", key.issuer, key.public_pem, kid=key.kid)
    return key


async def _me(client: Any, token: str) -> int:
    response = await client.get("/v1/me", headers={"Authorization": f"Bearer {token}"})
    return int(response.status)


async def _revoke(client: Any, headers: dict[str, str], issuer: str = ISSUER, kid: str = "portal-key-1") -> Any:
    return await client.post(REVOKE, json={"issuer": issuer, "kid": kid}, headers=headers)


def _details(event: Any) -> dict[str, Any]:
    return dict(json.loads(event["details"]))


def _key_id(event: Any) -> Any:
    """The kid of the key that verified the actor's token, as the event's signed entry records it."""
    return decode_entry(bytes(event["entry"])).get("key_id")


async def test_a_revoked_keys_tokens_are_refused_at_once_and_the_issuers_other_key_still_works(
    client, portals: Portals, rotated: TestIssuer, database: Dsns
) -> None:
    cached = portals.acme.token()
    unnamed = jwt.encode(portals.acme.claims(), portals.acme.private_key, algorithm="EdDSA")  # no kid
    other = rotated.token()
    for token in (cached, unnamed, other):
        assert await _me(client, token) == 200  # verified, and now in both caches

    response = await _revoke(client, rotated.auth(**ADMIN))
    assert response.status == 200, await response.text()
    body = await response.json()
    assert (body["issuer"], body["kid"], body["algorithm"], body["active_keys"]) == (ISSUER, "portal-key-1", "EdDSA", 1)

    assert await _me(client, cached) == 401  # the very token this process had verified and cached
    assert await _me(client, unnamed) == 401
    assert await _me(client, portals.acme.token(sub="Patient/2")) == 401  # a fresh one
    assert await _me(client, other) == 200
    assert await _me(client, rotated.token(sub="Patient/2")) == 200

    (revoked,) = await audit_events(database.owner, "action = 'issuer:revoke'")
    assert (revoked["actor"], revoked["actor_role"], revoked["outcome"]) == ("Practitioner/admin", "admin", "success")
    assert (revoked["resource_type"], revoked["resource_id"]) == ("Issuer", ISSUER)
    assert _details(revoked) == {"kid": "portal-key-1", "already_revoked": False, "active_keys": 1}
    assert _key_id(revoked) == "portal-key-2"  # the key of the admin's own token
    denied = await audit_events(database.owner, "action = 'auth:denied'")
    # A token naming the revoked key and signed by it says so; one naming no key fails the others' signatures.
    assert [(_details(e)["reason"], _key_id(e)) for e in denied] == [
        ("revoked-key", "portal-key-1"),
        ("bad-signature", None),
        ("revoked-key", "portal-key-1"),
    ]


async def test_revoking_a_revoked_key_changes_nothing_and_answers_the_same(
    client, portals: Portals, rotated: TestIssuer, database: Dsns
) -> None:
    first = await _revoke(client, rotated.auth(**ADMIN))
    again = await _revoke(client, rotated.auth(**ADMIN))
    assert (first.status, again.status) == (200, 200)
    assert await first.json() == await again.json()  # revoked_at is the first revocation's

    events = await audit_events(database.owner, "action = 'issuer:revoke'")
    assert [_details(e)["already_revoked"] for e in events] == [False, True]


async def test_the_admin_listing_shows_revoked_keys_with_when_they_were_revoked(
    client, portals: Portals, rotated: TestIssuer
) -> None:
    admin = rotated.auth(**ADMIN)
    revoked = await (await _revoke(client, admin)).json()

    response = await client.get("/v1/admin/issuers", headers=admin)

    assert response.status == 200
    assert [(k["kid"], k["revoked_at"]) for k in (await response.json())["items"]] == [
        ("portal-key-1", revoked["revoked_at"]),
        ("portal-key-2", None),
    ]


async def test_the_last_key_of_an_issuer_may_be_revoked_and_it_then_authenticates_nobody(
    client, portals: Portals
) -> None:
    response = await _revoke(client, portals.acme.auth(**ADMIN))
    assert response.status == 200
    assert (await response.json())["active_keys"] == 0
    for identity in (ADMIN, {"role": "patient", "sub": "Patient/1"}):
        assert await _me(client, portals.acme.token(**identity)) == 401
    assert await _me(client, portals.globex.token()) == 200  # another tenant's portal is untouched


async def test_a_revoked_key_is_never_trusted_again_but_a_new_one_is_at_once(
    client, portals: Portals, rotated: TestIssuer, database: Dsns
) -> None:
    admin = rotated.auth(**ADMIN)
    assert (await _revoke(client, admin)).status == 200
    revoked_pem = portals.acme.public_pem.decode()
    for issuer, kid in ((ISSUER, "portal-key-1"), (ISSUER, "portal-key-9"), ("https://other.acme.test", "k1")):
        response = await client.post(
            "/v1/admin/issuers", json={"issuer": issuer, "public_key_pem": revoked_pem, "kid": kid}, headers=admin
        )
        assert response.status == 409, (issuer, kid)
        assert (await response.json())["code"] == "key-revoked"
    assert await _me(client, portals.acme.token()) == 401
    attempts = await audit_events(database.owner, "action = 'issuer:add' AND outcome = 'denied'")
    assert [(e["actor"], e["resource_id"], _details(e)) for e in attempts] == [
        ("Practitioner/admin", issuer, {"kid": kid, "reason": "key-revoked"})
        for issuer, kid in ((ISSUER, "portal-key-1"), (ISSUER, "portal-key-9"), ("https://other.acme.test", "k1"))
    ]

    fresh = TestIssuer(tenant="acme", issuer=ISSUER, kid="portal-key-3")
    body = {
        "issuer": ISSUER,
        "public_key_pem": fresh.public_pem.decode(),
        "kid": fresh.kid,
        "endorsement": rotated.endorse(fresh),  # by the issuer's key still trusted
    }
    assert (await client.post("/v1/admin/issuers", json=body, headers=admin)).status == 201
    assert await _me(client, fresh.token()) == 200  # the cache of this issuer was cleared by the add


async def test_a_key_revoked_under_one_kid_is_refused_under_every_kid(
    client, portals: Portals, services: Services, database: Dsns
) -> None:
    # The operator, too, could hold one key under two kids (or issuers) and revoke only one of them.
    for issuer, kid in ((ISSUER, "portal-key-1-again"), ("https://other.acme.test", "portal-key-1")):
        with pytest.raises(KeyInUseError):
            await services.issuers.add_key("acme", issuer, portals.acme.public_pem, kid=kid)
    attempts = await audit_events(database.owner, "action = 'issuer:add' AND outcome = 'denied'")
    assert [(e["actor_role"], e["resource_id"], _details(e)) for e in attempts] == [
        (
            "operator",
            issuer,
            {"kid": kid, "reason": "key-in-use", "active_issuer": ISSUER, "active_kid": "portal-key-1"},
        )
        for issuer, kid in ((ISSUER, "portal-key-1-again"), ("https://other.acme.test", "portal-key-1"))
    ]
    # The same key under the same name is still the no-op it was.
    await services.issuers.add_key("acme", ISSUER, portals.acme.public_pem, kid="portal-key-1")

    await services.issuers.revoke_key("acme", ISSUER, "portal-key-1")

    # The key portal-key-1 named is revoked for good: a token it signs is refused, whatever kid it names.
    for kid in ("portal-key-1-again", "portal-key-1"):
        assert await _me(client, portals.acme.token(headers={"kid": kid})) == 401, kid
    unnamed = jwt.encode(portals.acme.claims(), portals.acme.private_key, algorithm="EdDSA")
    assert await _me(client, unnamed) == 401


async def test_revoking_a_key_held_under_two_names_from_before_migration_0016_revokes_both(
    client, portals: Portals, services: Services, database: Dsns
) -> None:
    """A database from before 0016 may hold one key under several names (0016 refuses to run on it until
    they are revoked): revoking any one of them revokes the key under all, and the event names each."""
    owner = await asyncpg.connect(database.owner)
    try:
        await owner.execute("DROP INDEX IF EXISTS issuer_keys_one_name_per_key")  # as before 0016
        await owner.execute(
            "INSERT INTO issuers (tenant_id, issuer, roles, registered_by) "
            "SELECT tenant_id, 'https://other.acme.test', roles, 'admin' FROM issuers WHERE issuer = $1",
            ISSUER,
        )
        for issuer, kid in ((ISSUER, "shadow"), ("https://other.acme.test", "elsewhere")):
            await owner.execute(
                "INSERT INTO issuer_keys (tenant_id, issuer_id, kid, algorithm, public_key_pem) "
                "SELECT k.tenant_id, i.id, $2, k.algorithm, k.public_key_pem FROM issuer_keys k "
                "JOIN issuers i ON i.tenant_id = k.tenant_id AND i.issuer = $1 WHERE k.kid = 'portal-key-1'",
                issuer,
                kid,
            )
    finally:
        await owner.close()
    other = TestIssuer(tenant="acme", issuer="https://other.acme.test", kid="elsewhere")
    other.private_key = portals.acme.private_key
    assert await _me(client, other.token()) == 200

    response = await _revoke(client, portals.acme.auth(**ADMIN), kid="shadow")

    assert response.status == 200, await response.text()
    assert (await response.json())["active_keys"] == 0
    for token in (portals.acme.token(), portals.acme.token(headers={"kid": "shadow"}), other.token()):
        assert await _me(client, token) == 401
    (revoked,) = await audit_events(database.owner, "action = 'issuer:revoke'")
    assert _details(revoked) == {
        "kid": "shadow",
        "already_revoked": False,
        "active_keys": 0,
        "also_revoked_issuers": [ISSUER, "https://other.acme.test"],
        "also_revoked_kids": ["portal-key-1", "elsewhere"],
    }


@pytest.mark.parametrize(
    ("issuer", "kid"),
    [
        (ISSUER, "no-such-kid"),
        ("https://portal.unknown.test", "portal-key-1"),
        ("https://portal.globex.test", "portal-key-1"),  # globex's issuer and kid: unknown in acme
    ],
    ids=["unknown-kid", "unknown-issuer", "another-tenants-issuer"],
)
async def test_an_unknown_issuer_or_kid_is_not_found_and_audited(
    client, portals: Portals, database: Dsns, issuer: str, kid: str
) -> None:
    response = await _revoke(client, portals.acme.auth(**ADMIN), issuer=issuer, kid=kid)
    assert response.status == 404
    assert (await response.json())["code"] == "not-found"

    (event,) = await audit_events(database.owner, "action = 'access:denied'")
    assert (event["actor"], event["outcome"], event["resource_type"], event["resource_id"]) == (
        "Practitioner/admin",
        "denied",
        "Issuer",
        issuer,
    )
    assert _details(event) == {"attempt": "revoke", "kid": kid, "reason": "not-found"}
    assert await _me(client, portals.globex.token()) == 200
    assert await _me(client, portals.acme.token()) == 200


@pytest.mark.parametrize(
    "identity",
    [
        {"role": "patient", "sub": "Patient/1"},
        {"role": "proxy", "sub": "RelatedPerson/1", "act_for": "Patient/1"},
        {"role": "physician", "sub": "Practitioner/7"},
        {"role": "staff", "sub": "Practitioner/8"},
        {"role": "compliance", "sub": "Practitioner/c1"},
    ],
    ids=lambda identity: identity["role"],
)
async def test_only_the_tenants_admin_may_revoke(
    client, portals: Portals, database: Dsns, identity: dict[str, str]
) -> None:
    response = await _revoke(client, portals.acme.auth(**identity))
    assert response.status == 404
    assert (await response.json())["code"] == "not-found"
    assert await _me(client, portals.acme.token()) == 200

    (event,) = await audit_events(database.owner, "action = 'access:denied'")
    assert (event["actor"], event["resource_type"], event["resource_id"]) == (
        identity["sub"],
        "Route",
        "revoke_issuer_key",
    )
    assert _details(event) == {"reason": "role"}
    assert await audit_events(database.owner, "action = 'issuer:revoke'") == []


async def test_a_forged_token_naming_a_revoked_key_is_a_bad_signature_not_that_keys_use(
    client, portals: Portals, services: Services, database: Dsns
) -> None:
    await services.issuers.revoke_key("acme", ISSUER, "portal-key-1")
    # Anyone can put a revoked kid in a header; only the revoked key's own signature is its use.
    forger = TestIssuer(tenant="acme", issuer=ISSUER, kid="portal-key-1")
    assert await _me(client, forger.token()) == 401
    assert await _me(client, portals.acme.token()) == 401

    denied = await audit_events(database.owner, "action = 'auth:denied'")
    assert [(_details(e)["reason"], _key_id(e)) for e in denied] == [
        ("bad-signature", None),
        ("revoked-key", "portal-key-1"),
    ]
