"""A tenant admin adds a key to an existing issuer only with the issuer's endorsement, and registers new
issuers only with the roles the operator allows.

The finding this answers: an admin (who sees no patient content) registered a key of their own under the
EHR portal's issuer name, then signed physician or compliance tokens with it that the service accepted.
Now a key for an existing issuer needs a JWS one of the issuer's active keys signed over the new key's
fingerprint (the portal rotating its own key); anything else is a 403 that writes nothing but its audit
event. Real PostgreSQL, the real app on loopback, real keys.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg
import jwt
import pytest
from aiohttp import ClientResponse

from service.domain.audit import decode_entry
from service.domain.principal import Role
from service.errors import InvalidRequestError
from service.settings import Settings
from tests.conftest import Dsns, Portals, Services
from tests.support import TestIssuer, audit_events

ISSUERS = "/v1/admin/issuers"
ISSUER = "https://portal.acme.test"
ADMIN = {"role": "admin", "sub": "Practitioner/admin1"}
ALL_ROLES = ["patient", "proxy", "physician", "staff", "compliance", "admin"]
PHYSICIAN = {"role": "physician", "sub": "Practitioner/7"}


def _body(key: TestIssuer, **extra: Any) -> dict[str, Any]:
    return {"issuer": key.issuer, "public_key_pem": key.public_pem.decode(), "kid": key.kid, **extra}


async def _problem(response: ClientResponse, status: int, code: str) -> dict[str, Any]:
    text = await response.text()
    assert response.status == status, text
    assert response.content_type == "application/problem+json"
    problem = json.loads(text)
    assert (problem["type"], problem["code"], problem["status"]) == (f"urn:bedside:problem:{code}", code, status)
    return dict(problem)


async def _me(client: Any, key: TestIssuer, identity: dict[str, str] = PHYSICIAN) -> int:
    return int((await client.get("/v1/me", headers=key.auth(**identity))).status)


async def _acme_keys(client: Any, portals: Portals) -> list[tuple[str, str]]:
    listed = await (await client.get(ISSUERS, headers=portals.acme.auth(**ADMIN))).json()
    return [(key["issuer"], key["kid"]) for key in listed["items"]]


async def _issuer_rows(database: Dsns) -> int:
    owner = await asyncpg.connect(database.owner)
    try:
        return int(await owner.fetchval("SELECT count(*) FROM issuers"))
    finally:
        await owner.close()


def _details(event: Any) -> dict[str, Any]:
    return dict(json.loads(event["details"]))


def _key_id(event: Any) -> Any:
    """The kid of the key that verified the token, as the event's signed entry records it."""
    return decode_entry(bytes(event["entry"])).get("key_id")


async def _admins_adds(database: Dsns) -> list[Any]:
    """The `issuer:add` events of tenant admins (the portals' own keys were the operator's)."""
    return await audit_events(database.owner, "action = 'issuer:add' AND actor_role = 'admin'")


# --- the attack ---------------------------------------------------------------------------------------------


async def test_an_admin_cannot_put_their_own_key_under_the_portals_issuer(
    client, portals: Portals, database: Dsns
) -> None:
    own = TestIssuer(tenant="acme", issuer=ISSUER, kid="admins-own-key")

    response = await client.post(ISSUERS, json=_body(own), headers=portals.acme.auth(**ADMIN))

    problem = await _problem(response, 403, "endorsement-required")
    assert "endorsement" in problem["detail"]
    # The key was not added, so what it signs is nobody's token: a physician's, a compliance officer's.
    for identity in (PHYSICIAN, {"role": "compliance", "sub": "Practitioner/c1"}, ADMIN):
        assert await _me(client, own, identity) == 401
    assert await _acme_keys(client, portals) == [(ISSUER, "portal-key-1")]
    (attempt,) = await _admins_adds(database)
    assert (attempt["actor"], attempt["actor_role"], attempt["outcome"]) == ("Practitioner/admin1", "admin", "denied")
    assert (attempt["resource_type"], attempt["resource_id"]) == ("Issuer", ISSUER)
    assert _details(attempt) == {"kid": "admins-own-key", "reason": "endorsement-missing"}


async def test_the_admin_cannot_endorse_their_own_key_with_it(client, portals: Portals, database: Dsns) -> None:
    own = TestIssuer(tenant="acme", issuer=ISSUER, kid="admins-own-key")

    response = await client.post(
        ISSUERS, json=_body(own, endorsement=own.endorse(own)), headers=portals.acme.auth(**ADMIN)
    )

    await _problem(response, 403, "endorsement-invalid")
    assert await _me(client, own) == 401
    (attempt,) = await _admins_adds(database)
    assert _details(attempt) == {"kid": "admins-own-key", "reason": "endorsement-unknown-key"}


# --- a rotation, as the portal does it ---------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["EdDSA", "ES256", "RS256"])
async def test_the_portal_rotates_its_key_through_the_admin_api_with_an_endorsement(
    client, portals: Portals, services: Services, database: Dsns, algorithm: str
) -> None:
    portal = TestIssuer(tenant="acme", issuer="https://ehr.acme.test", algorithm=algorithm, kid="ehr-1")
    await services.issuers.add_key("acme", portal.issuer, portal.public_pem, kid=portal.kid)
    new = TestIssuer(tenant="acme", issuer=portal.issuer, algorithm=algorithm, kid="ehr-2")
    assert await _me(client, new) == 401

    response = await client.post(
        ISSUERS, json=_body(new, endorsement=portal.endorse(new)), headers=portal.auth(**ADMIN)
    )

    assert response.status == 201, await response.text()
    assert await response.json() == {
        "issuer": portal.issuer,
        "kid": "ehr-2",
        "algorithm": algorithm,
        "revoked_at": None,
        "roles": ALL_ROLES,  # the issuer's, unchanged
        "registered_by": "operator",
    }
    me = await client.get("/v1/me", headers=new.auth(**PHYSICIAN))
    assert me.status == 200, await me.text()
    assert (await me.json())["issuer"] == portal.issuer
    assert await _me(client, portal) == 200  # the old key goes on until it is revoked
    (added,) = await _admins_adds(database)
    assert (added["outcome"], added["resource_id"]) == ("success", portal.issuer)
    assert _details(added) == {"kid": "ehr-2", "endorsed_by": "ehr-1"}


async def test_a_key_without_a_kid_is_endorsed_by_its_fingerprint_which_becomes_its_kid(
    client, portals: Portals
) -> None:
    new = TestIssuer(tenant="acme", issuer=ISSUER)
    body = _body(new, endorsement=portals.acme.endorse(new))
    del body["kid"]

    response = await client.post(ISSUERS, json=body, headers=portals.acme.auth(**ADMIN))

    assert response.status == 201, await response.text()
    assert (await response.json())["kid"] == new.fingerprint
    new.kid = new.fingerprint
    assert await _me(client, new) == 200


# --- endorsements that are refused -------------------------------------------------------------------------


def _b64(data: bytes | dict[str, Any]) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _hs256_keyed_with_public_pem(portals: Portals, new: TestIssuer) -> str:
    """Algorithm confusion: an HMAC keyed with the portal's public key, which anyone can compute."""
    _, payload, _ = portals.acme.endorse(new).split(".")
    signing_input = f"{_b64({'alg': 'HS256', 'kid': portals.acme.kid})}.{payload}"
    mac = hmac.new(portals.acme.public_pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(mac)}"


def _tampered(portals: Portals, new: TestIssuer) -> str:
    """An endorsement of another key whose claims were changed to name this one."""
    header, _, signature = portals.acme.endorse(TestIssuer(tenant="acme", issuer=ISSUER)).split(".")
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "tid": "acme",
        "aud": "bedside",
        "purpose": "issuer-key-endorsement",
        "key": new.fingerprint,
        "iat": now,
        "exp": now + 300,
    }
    return f"{header}.{_b64(claims)}.{signature}"


def _impostor(portals: Portals, new: TestIssuer) -> str:
    """Signed by a key nobody registered, naming the portal's kid."""
    return TestIssuer(tenant="acme", issuer=ISSUER, kid=portals.acme.kid).endorse(new)


Endorse = Callable[[Portals, TestIssuer], str]

INVALID: list[Any] = [
    pytest.param(lambda p, new: p.acme.endorse(TestIssuer(tenant="acme", issuer=ISSUER)), "wrong-key", id="other-key"),
    pytest.param(
        lambda p, new: p.acme.endorse(new, iat=int(time.time()) - 400, exp=int(time.time()) - 120),
        "expired",
        id="expired",
    ),
    pytest.param(
        lambda p, new: p.acme.endorse(new, iat=int(time.time()), exp=int(time.time()) + 601),
        "lifetime-too-long",
        id="lifetime-over-10-minutes",
    ),
    pytest.param(
        lambda p, new: p.acme.endorse(new, iat=int(time.time()) + 300, exp=int(time.time()) + 600),
        "not-yet-valid",
        id="issued-in-the-future",
    ),
    pytest.param(lambda p, new: p.acme.token(**ADMIN), "missing-claim", id="login-token"),
    pytest.param(lambda p, new: p.acme.endorse(new, purpose="login"), "wrong-purpose", id="wrong-purpose"),
    pytest.param(lambda p, new: p.acme.endorse(new, purpose=None), "missing-claim", id="no-purpose"),
    pytest.param(lambda p, new: p.acme.endorse(new, key=None), "missing-claim", id="no-key"),
    pytest.param(lambda p, new: p.acme.endorse(new, tid="globex"), "wrong-tenant", id="wrong-tenant"),
    pytest.param(lambda p, new: p.acme.endorse(new, iss=p.globex.issuer), "wrong-issuer", id="wrong-issuer"),
    pytest.param(lambda p, new: p.acme.endorse(new, aud="another-service"), "wrong-audience", id="wrong-audience"),
    pytest.param(lambda p, new: p.acme.endorse(new, headers={"kid": None}), "missing-kid", id="no-kid"),
    pytest.param(lambda p, new: p.acme.endorse(new, headers={"kid": "no-such-kid"}), "unknown-key", id="unknown-kid"),
    pytest.param(_impostor, "bad-signature", id="signed-by-another-key"),
    pytest.param(_tampered, "bad-signature", id="tampered-claims"),
    pytest.param(lambda p, new: p.globex.endorse(new, iss=ISSUER, tid="acme"), "bad-signature", id="globex-key"),
    pytest.param(_hs256_keyed_with_public_pem, "algorithm-not-allowed", id="hs256-keyed-with-public-pem"),
    pytest.param(lambda p, new: "YWJj.e30.c2ln", "malformed", id="header-not-json"),
]


@pytest.mark.parametrize(("endorse", "reason"), INVALID)
async def test_an_invalid_endorsement_is_refused_and_adds_nothing(
    client, portals: Portals, database: Dsns, endorse: Endorse, reason: str
) -> None:
    new = TestIssuer(tenant="acme", issuer=ISSUER, kid="portal-key-2")

    response = await client.post(
        ISSUERS, json=_body(new, endorsement=endorse(portals, new)), headers=portals.acme.auth(**ADMIN)
    )

    problem = await _problem(response, 403, "endorsement-invalid")
    assert reason not in json.dumps(problem)  # the reason is the audit log's, not the caller's
    assert await _me(client, new) == 401
    assert await _acme_keys(client, portals) == [(ISSUER, "portal-key-1")]
    (attempt,) = await _admins_adds(database)
    assert (attempt["actor"], attempt["outcome"]) == ("Practitioner/admin1", "denied")
    assert _details(attempt)["reason"] == f"endorsement-{reason}"


async def test_an_endorsement_by_a_revoked_key_is_refused_and_names_that_key(
    client, portals: Portals, services: Services, database: Dsns
) -> None:
    second = TestIssuer(tenant="acme", issuer=ISSUER, kid="portal-key-2")
    await services.issuers.add_key("acme", ISSUER, second.public_pem, kid=second.kid)
    await services.issuers.revoke_key("acme", ISSUER, portals.acme.kid)  # leaked, say
    new = TestIssuer(tenant="acme", issuer=ISSUER, kid="portal-key-3")

    response = await client.post(
        ISSUERS, json=_body(new, endorsement=portals.acme.endorse(new)), headers=second.auth(**ADMIN)
    )

    await _problem(response, 403, "endorsement-invalid")
    assert await _me(client, new) == 401
    (attempt,) = await _admins_adds(database)
    assert _details(attempt) == {
        "kid": "portal-key-3",
        "reason": "endorsement-revoked-key",
        "endorsement_kid": "portal-key-1",
    }
    # The issuer's key still trusted endorses it, and that works.
    endorsed = await client.post(
        ISSUERS, json=_body(new, endorsement=second.endorse(new)), headers=second.auth(**ADMIN)
    )
    assert endorsed.status == 201, await endorsed.text()
    assert await _me(client, new) == 200


async def test_an_endorsement_replayed_with_another_kid_is_refused_and_revoking_the_key_stops_it(
    client, portals: Portals, services: Services, database: Dsns
) -> None:
    # An endorsement binds the key, not its kid: replayed with another kid, it used to register the same key
    # a second time (201), and revoking the kid the portal knew left the key trusted under the other.
    new = TestIssuer(tenant="acme", issuer=ISSUER, kid="portal-key-2")
    endorsement = portals.acme.endorse(new)
    first = await client.post(ISSUERS, json=_body(new, endorsement=endorsement), headers=portals.acme.auth(**ADMIN))
    assert first.status == 201, await first.text()

    replay = await client.post(
        ISSUERS, json=_body(new, kid="shadow", endorsement=endorsement), headers=portals.acme.auth(**ADMIN)
    )

    await _problem(replay, 409, "key-in-use")
    assert await _acme_keys(client, portals) == [(ISSUER, "portal-key-1"), (ISSUER, "portal-key-2")]
    (added, refused) = await _admins_adds(database)
    assert (added["outcome"], refused["outcome"]) == ("success", "denied")
    assert _details(refused) == {
        "kid": "shadow",
        "reason": "key-in-use",
        "active_issuer": ISSUER,
        "active_kid": "portal-key-2",
    }
    # The same key under the same kid stays the no-op retry it was.
    again = await client.post(ISSUERS, json=_body(new, endorsement=endorsement), headers=portals.acme.auth(**ADMIN))
    assert again.status == 201, await again.text()

    # The key leaks; the operator revokes it by the kid it was registered under: it signs nothing any more,
    # whatever kid its tokens name, or none.
    await services.issuers.revoke_key("acme", ISSUER, "portal-key-2")
    physician = {"role": "physician", "sub": "Practitioner/7"}
    unnamed = jwt.encode(new.claims(**physician), new.private_key, algorithm="EdDSA")  # no kid: every key is tried
    for token in (new.token(**physician, headers={"kid": "shadow"}), new.token(**physician), unnamed):
        assert (await client.get("/v1/me", headers={"Authorization": f"Bearer {token}"})).status == 401


class TestAnEndorsedKeyUnderAnotherIssuer:
    @pytest.fixture
    def settings(self, settings: Settings) -> Settings:
        """Admins may register new issuers (for patients and proxies), whatever the default."""
        return settings.model_copy(update={"admin_issuer_roles": frozenset({Role.PATIENT, Role.PROXY})})

    async def test_is_refused_a_key_has_one_name_in_the_tenant(self, client, portals: Portals, database: Dsns) -> None:
        # The admin's own issuer, registered with the portal's endorsed key: two issuers, one key.
        new = TestIssuer(tenant="acme", issuer=ISSUER, kid="portal-key-2")
        endorsed = await client.post(
            ISSUERS, json=_body(new, endorsement=portals.acme.endorse(new)), headers=portals.acme.auth(**ADMIN)
        )
        assert endorsed.status == 201, await endorsed.text()
        elsewhere = TestIssuer(tenant="acme", issuer="https://admins-own.acme.test", kid="portal-key-2")
        elsewhere.private_key = new.private_key

        response = await client.post(
            ISSUERS, json=_body(elsewhere, roles=["patient"]), headers=portals.acme.auth(**ADMIN)
        )

        await _problem(response, 409, "key-in-use")
        assert await _me(client, elsewhere, {"role": "patient", "sub": "Patient/1"}) == 401
        assert await _acme_keys(client, portals) == [(ISSUER, "portal-key-1"), (ISSUER, "portal-key-2")]
        refused = (await _admins_adds(database))[-1]
        assert (refused["resource_id"], _details(refused)["reason"]) == ("https://admins-own.acme.test", "key-in-use")


async def test_an_issuer_with_no_active_key_gets_a_new_one_from_the_operator_only(
    client, portals: Portals, services: Services, database: Dsns
) -> None:
    # Else an admin could revoke every key of the portal's issuer, then put their own under its name.
    other_admin = TestIssuer(tenant="acme", issuer="https://admins.acme.test", kid="a1")
    await services.issuers.add_key("acme", other_admin.issuer, other_admin.public_pem, kid=other_admin.kid)
    revoked = await client.post(
        "/v1/admin/issuers/revoke", json={"issuer": ISSUER, "kid": "portal-key-1"}, headers=other_admin.auth(**ADMIN)
    )
    assert (await revoked.json())["active_keys"] == 0
    new = TestIssuer(tenant="acme", issuer=ISSUER, kid="portal-key-2")

    for endorsement in (None, portals.acme.endorse(new)):
        body = _body(new) if endorsement is None else _body(new, endorsement=endorsement)
        response = await client.post(ISSUERS, json=body, headers=other_admin.auth(**ADMIN))
        problem = await _problem(response, 403, "endorsement-required")
        assert "operator" in problem["detail"]
    assert await _me(client, new) == 401
    attempts = await _admins_adds(database)
    assert [_details(e)["reason"] for e in attempts] == ["no-active-key", "no-active-key"]

    await services.issuers.add_key("acme", ISSUER, new.public_pem, kid=new.kid)  # `bedside issuer add`
    assert await _me(client, new) == 200


async def test_roles_for_an_existing_issuer_are_refused_even_with_an_endorsement(
    client, portals: Portals, services: Services, database: Dsns
) -> None:
    await services.issuers.set_roles("acme", ISSUER, frozenset({Role.PATIENT, Role.PROXY, Role.ADMIN}))
    new = TestIssuer(tenant="acme", issuer=ISSUER, kid="portal-key-2")
    body = _body(new, endorsement=portals.acme.endorse(new), roles=["patient", "physician"])

    response = await client.post(ISSUERS, json=body, headers=portals.acme.auth(**ADMIN))

    await _problem(response, 403, "issuer-roles-not-allowed")
    assert await _me(client, new, {"role": "patient", "sub": "Patient/1"}) == 401
    (attempt,) = await _admins_adds(database)
    assert _details(attempt) == {
        "kid": "portal-key-2",
        "reason": "roles-of-existing-issuer",
        "roles": ["patient", "physician"],
    }
    listed = await (await client.get(ISSUERS, headers=portals.acme.auth(**ADMIN))).json()
    assert [k["roles"] for k in listed["items"]] == [["patient", "proxy", "admin"]]


# --- new issuers an admin registers ------------------------------------------------------------------------


class TestAnOperatorWhoLetsAdminsGiveEveryRole:
    """BEDSIDE_ADMIN_ISSUER_ROLES set to all six (its default, until it became none)."""

    @pytest.fixture
    def settings(self, settings: Settings) -> Settings:
        return settings.model_copy(update={"admin_issuer_roles": frozenset(Role)})

    async def test_an_admin_registers_a_new_issuer_with_the_roles_asked_and_its_tokens_carry_that_issuer(
        self, client, portals: Portals, database: Dsns
    ) -> None:
        kiosk = TestIssuer(tenant="acme", issuer="https://kiosk.acme.test", kid="kiosk-1")

        response = await client.post(
            ISSUERS, json=_body(kiosk, roles=["proxy", "patient"]), headers=portals.acme.auth(**ADMIN)
        )

        assert response.status == 201, await response.text()
        out = await response.json()
        assert (out["roles"], out["registered_by"]) == (["patient", "proxy"], "admin")
        patient = await client.get("/v1/me", headers=kiosk.auth(role="patient", sub="Patient/1"))
        assert patient.status == 200
        assert (await patient.json())["issuer"] == kiosk.issuer  # its own issuer, never the portal's
        assert await _me(client, kiosk, PHYSICIAN) == 401
        assert await _me(client, kiosk, ADMIN) == 401
        listed = await (await client.get(ISSUERS, headers=portals.acme.auth(**ADMIN))).json()
        assert [(k["issuer"], k["roles"], k["registered_by"]) for k in listed["items"]] == [
            ("https://kiosk.acme.test", ["patient", "proxy"], "admin"),
            (ISSUER, ALL_ROLES, "operator"),
        ]
        (added,) = await _admins_adds(database)
        assert _details(added) == {
            "kid": "kiosk-1",
            "new_issuer": True,
            "roles": ["patient", "proxy"],
            "registered_by": "admin",
        }

    async def test_without_roles_a_new_issuer_gets_every_role_the_setting_allows(
        self, client, portals: Portals
    ) -> None:
        kiosk = TestIssuer(tenant="acme", issuer="https://kiosk.acme.test", kid="kiosk-1")
        response = await client.post(ISSUERS, json=_body(kiosk), headers=portals.acme.auth(**ADMIN))
        assert response.status == 201, await response.text()
        assert (await response.json())["roles"] == ALL_ROLES
        assert await _me(client, kiosk) == 200


class TestTheOperatorCapsTheRolesOfIssuersAdminsRegister:
    @pytest.fixture
    def settings(self, settings: Settings) -> Settings:
        return settings.model_copy(update={"admin_issuer_roles": frozenset({Role.PATIENT, Role.PROXY})})

    async def test_a_new_issuer_gets_the_allowed_roles_by_default(self, client, portals: Portals) -> None:
        kiosk = TestIssuer(tenant="acme", issuer="https://kiosk.acme.test", kid="kiosk-1")
        response = await client.post(ISSUERS, json=_body(kiosk), headers=portals.acme.auth(**ADMIN))
        assert response.status == 201, await response.text()
        assert (await response.json())["roles"] == ["patient", "proxy"]
        assert await _me(client, kiosk, {"role": "patient", "sub": "Patient/1"}) == 200
        assert await _me(client, kiosk, PHYSICIAN) == 401

    @pytest.mark.parametrize("roles", [["physician"], ["patient", "admin"]], ids=["physician", "admin-too"])
    async def test_asking_for_more_is_refused_and_writes_nothing(
        self, client, portals: Portals, database: Dsns, roles: list[str]
    ) -> None:
        kiosk = TestIssuer(tenant="acme", issuer="https://kiosk.acme.test", kid="kiosk-1")
        before = await _issuer_rows(database)

        response = await client.post(ISSUERS, json=_body(kiosk, roles=roles), headers=portals.acme.auth(**ADMIN))

        problem = await _problem(response, 403, "issuer-roles-not-allowed")
        assert "patient, proxy" in problem["detail"]
        assert await _issuer_rows(database) == before
        assert await _me(client, kiosk, {"role": roles[-1], "sub": "Practitioner/9"}) == 401
        (attempt,) = await _admins_adds(database)
        assert (attempt["outcome"], attempt["resource_id"]) == ("denied", kiosk.issuer)
        assert _details(attempt) == {"kid": "kiosk-1", "reason": "roles-not-allowed", "roles": roles}

    async def test_the_portals_own_rotation_is_not_bound_by_it(self, client, portals: Portals) -> None:
        new = TestIssuer(tenant="acme", issuer=ISSUER, kid="portal-key-2")
        body = _body(new, endorsement=portals.acme.endorse(new))
        assert (await client.post(ISSUERS, json=body, headers=portals.acme.auth(**ADMIN))).status == 201
        assert await _me(client, new, PHYSICIAN) == 200


class TestTheServicesOwnIssuerNamesAreReserved:
    """`urn:bedside:webhook:<endpoint id>` is the issuer the service gives an inbound webhook reply's principal,
    `urn:bedside:dev-issuer` embedded mode's development issuer: registered by anyone else, their tokens would
    carry in every audit event an issuer the log's reader takes for the service's own."""

    @pytest.fixture
    def settings(self, settings: Settings) -> Settings:
        """Admins may register new issuers (for patients and proxies), whatever the default."""
        return settings.model_copy(update={"admin_issuer_roles": frozenset({Role.PATIENT, Role.PROXY})})

    @pytest.mark.parametrize(
        "name",
        [
            f"urn:bedside:webhook:{uuid.UUID(int=7)}",
            "urn:bedside:dev-issuer",
            "URN:Bedside:webhook:x",  # a URN's scheme and namespace are case-insensitive (RFC 8141)
            " urn:bedside:anything",
        ],
        ids=["webhook-endpoint-issuer", "dev-issuer", "other-case", "leading-blank"],
    )
    async def test_an_admin_cannot_register_an_issuer_in_the_services_own_namespace(
        self, client, portals: Portals, services: Services, database: Dsns, name: str
    ) -> None:
        own = TestIssuer(tenant="acme", issuer=name, kid="mine")
        before = await _issuer_rows(database)

        response = await client.post(ISSUERS, json=_body(own, roles=["patient"]), headers=portals.acme.auth(**ADMIN))

        problem = await _problem(response, 422, "validation-failed")
        assert [(e["loc"], e["type"]) for e in problem["errors"]] == [(["issuer"], "reserved")]
        assert await _issuer_rows(database) == before
        assert await _me(client, own, {"role": "patient", "sub": "Patient/1"}) == 401
        (attempt,) = await _admins_adds(database)
        assert (attempt["outcome"], attempt["resource_id"]) == ("denied", name)
        assert _details(attempt) == {"kid": "mine", "reason": "reserved-issuer-name"}

        # Nor the operator (embedded mode registers the development issuer itself: tests/e2e/test_cli.py).
        with pytest.raises(InvalidRequestError) as refused:
            await services.issuers.add_key("acme", name, own.public_pem, kid="mine")
        assert [p.type for p in refused.value.problems] == ["reserved"]
        assert await _issuer_rows(database) == before
        operators = await audit_events(database.owner, "action = 'issuer:add' AND actor_role = 'operator'")
        assert [(e["outcome"], _details(e)["reason"]) for e in operators[2:]] == [("denied", "reserved-issuer-name")]

    @pytest.mark.parametrize(
        "name",
        [
            "urn:bedside\uff1adev-issuer",  # FULLWIDTH COLON: NFKC makes it urn:bedside:dev-issuer
            "\uff55\uff52\uff4e:bedside:dev-issuer",  # FULLWIDTH u, r, n
            "urn:\uff42\uff45\uff44\uff53\uff49\uff44\uff45:webhook:x",  # FULLWIDTH bedside
            "urn:b\u0435dside:dev-issuer",  # CYRILLIC SMALL LETTER IE for the e: the same on screen, no NFKC form
            "urn:\u3164bedside:dev-issuer",  # HANGUL FILLER (printable, blank on screen) after the colon
            "urn:bed\u034fside:dev-issuer",  # COMBINING GRAPHEME JOINER (printable, no glyph) inside bedside
        ],
        ids=["fullwidth-colon", "fullwidth-urn", "fullwidth-bedside", "cyrillic-e", "hangul-filler", "cgj"],
    )
    async def test_a_name_that_reads_as_one_of_the_services_own_is_refused_too(
        self, client, portals: Portals, services: Services, database: Dsns, name: str
    ) -> None:
        # A reader of the audit log (or of `/v1/me`) sees `urn:bedside:dev-issuer`. Issuer names are printable
        # ASCII, so no look-alike, full-width or invisible character gets one in: refused, audited, nothing written.
        own = TestIssuer(tenant="acme", issuer=name, kid="mine")
        before = await _issuer_rows(database)

        response = await client.post(ISSUERS, json=_body(own, roles=["patient"]), headers=portals.acme.auth(**ADMIN))

        problem = await _problem(response, 422, "validation-failed")
        assert [(e["loc"], e["type"]) for e in problem["errors"]] == [(["issuer"], "value")]
        assert "printable ASCII" in problem["errors"][0]["msg"]
        assert await _issuer_rows(database) == before
        assert await _me(client, own, {"role": "patient", "sub": "Patient/1"}) == 401
        (attempt,) = await audit_events(database.owner, "action = 'issuer:add' AND outcome = 'denied'")
        assert _details(attempt) == {"kid": "mine", "reason": "issuer-name-not-ascii"}


class TestByDefaultAdminsRegisterNoNewIssuers:
    """With BEDSIDE_ADMIN_ISSUER_ROLES unset (or empty), a tenant admin cannot make an issuer of their own and
    sign, with it, the tokens of someone who reads patient content: every role does, one way or another."""

    @pytest.mark.parametrize("roles", [None, ["physician"], ["compliance"], ["patient"]])
    async def test_a_new_issuer_is_refused_audited_and_its_tokens_are_worthless(
        self, client, portals: Portals, database: Dsns, roles: list[str] | None
    ) -> None:
        kiosk = TestIssuer(tenant="acme", issuer="https://kiosk.acme.test", kid="kiosk-1")
        before = await _issuer_rows(database)
        body = _body(kiosk) if roles is None else _body(kiosk, roles=roles)

        response = await client.post(ISSUERS, json=body, headers=portals.acme.auth(**ADMIN))

        problem = await _problem(response, 403, "issuer-roles-not-allowed")
        assert "may not register new issuers" in problem["detail"]
        assert await _issuer_rows(database) == before
        for identity in (
            {"role": "patient", "sub": "Patient/1"},
            PHYSICIAN,
            {"role": "compliance", "sub": "Practitioner/c1"},
        ):
            assert await _me(client, kiosk, identity) == 401
        (attempt,) = await _admins_adds(database)
        assert (attempt["outcome"], _details(attempt)["reason"]) == ("denied", "roles-not-allowed")

    async def test_the_portals_own_rotation_still_works(self, client, portals: Portals) -> None:
        new = TestIssuer(tenant="acme", issuer=ISSUER, kid="portal-key-2")
        body = _body(new, endorsement=portals.acme.endorse(new))
        assert (await client.post(ISSUERS, json=body, headers=portals.acme.auth(**ADMIN))).status == 201
        assert await _me(client, new, PHYSICIAN) == 200


async def test_an_endorsement_is_never_a_login_token(client, portals: Portals, database: Dsns) -> None:
    new = TestIssuer(tenant="acme", issuer=ISSUER, kid="portal-key-2")
    endorsement = portals.acme.endorse(new)
    response = await client.get("/v1/me", headers={"Authorization": f"Bearer {endorsement}"})
    assert response.status == 401
    # Nor one dressed up as a login with every claim a login has: its `purpose` gives it away.
    dressed = portals.acme.endorse(new, sub="Practitioner/admin1", role="admin")
    response = await client.get("/v1/me", headers={"Authorization": f"Bearer {dressed}"})
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="bedside", error="invalid_token"'
    denied = await audit_events(database.owner, "action = 'auth:denied'")
    # Both signed by the portal's key, which each denial names.
    assert [(_details(e)["reason"], _key_id(e)) for e in denied] == [
        ("missing-claim", "portal-key-1"),
        ("unexpected-purpose", "portal-key-1"),
    ]
