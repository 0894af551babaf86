"""Each issuer authenticates only the roles it was given: a token whose `role` is not among them is a 401
like any other bad token, audited in the tenant with the reason `role-not-allowed` and the key that
verified it. The check uses what the issuer-key cache holds already; a change of roles clears this
process's entry, cached verified tokens included."""

from __future__ import annotations

import json
from typing import Any

import pytest

from service.domain.audit import decode_entry
from service.domain.principal import Role
from service.keys import ISSUERS
from service.settings import Settings
from tests.conftest import Dsns, Portals, Services
from tests.support import audit_events

ISSUER = "https://portal.acme.test"
PATIENT = {"role": "patient", "sub": "Patient/1"}
PROXY = {"role": "proxy", "sub": "RelatedPerson/1", "act_for": "Patient/1"}
PHYSICIAN = {"role": "physician", "sub": "Practitioner/7"}
ADMIN = {"role": "admin", "sub": "Practitioner/admin1"}


def _details(event: Any) -> dict[str, Any]:
    return dict(json.loads(event["details"]))


async def test_an_issuer_restricted_to_patients_and_proxies_refuses_a_physicians_token(
    client, portals: Portals, services: Services, database: Dsns
) -> None:
    await services.issuers.set_roles("acme", ISSUER, frozenset({Role.PATIENT, Role.PROXY}))

    refused = await client.get("/v1/me", headers=portals.acme.auth(**PHYSICIAN))

    assert refused.status == 401
    assert refused.content_type == "application/problem+json"
    assert refused.headers["WWW-Authenticate"] == 'Bearer realm="bedside", error="invalid_token"'
    assert (await refused.json())["code"] == "unauthenticated"
    for identity in (PATIENT, PROXY):
        accepted = await client.get("/v1/me", headers=portals.acme.auth(**identity))
        assert accepted.status == 200, await accepted.text()
        assert (await accepted.json())["role"] == identity["role"]
    assert (await client.get("/v1/me", headers=portals.globex.auth(**PHYSICIAN))).status == 200  # globex's own

    (denied,) = await audit_events(database.owner, "action = 'auth:denied'")
    acme = await services.tenants.get("acme")
    assert (denied["tenant_id"], denied["issuer"], denied["outcome"]) == (acme.id, ISSUER, "denied")
    assert _details(denied) == {"reason": "role-not-allowed"}
    assert decode_entry(bytes(denied["entry"])).get("key_id") == "portal-key-1"


@pytest.mark.parametrize("role", ["staff", "compliance", "admin"])
async def test_every_role_outside_the_issuers_roles_is_refused(
    client, portals: Portals, services: Services, role: str
) -> None:
    await services.issuers.set_roles("acme", ISSUER, frozenset({Role.PATIENT, Role.PHYSICIAN}))
    assert (await client.get("/v1/me", headers=portals.acme.auth(role=role, sub="Practitioner/9"))).status == 401
    assert (await client.get("/v1/me", headers=portals.acme.auth(**PHYSICIAN))).status == 200


class TestWithTheCachesOn:
    @pytest.fixture
    def settings(self, settings: Settings) -> Settings:
        """Issuer keys, and the tokens they verified, cached for five minutes in this process."""
        return settings.model_copy(update={"issuer_cache_seconds": 300})

    async def test_a_change_of_roles_in_this_process_refuses_a_token_it_had_verified(
        self, app, client, portals: Portals
    ) -> None:
        physician = portals.acme.auth(**PHYSICIAN)
        patient = portals.acme.auth(**PATIENT)
        for headers in (physician, patient):
            assert (await client.get("/v1/me", headers=headers)).status == 200  # verified, now cached

        await app[ISSUERS].set_roles("acme", ISSUER, frozenset({Role.PATIENT}))

        assert (await client.get("/v1/me", headers=physician)).status == 401  # the very token it had cached
        assert (await client.get("/v1/me", headers=patient)).status == 200

        await app[ISSUERS].set_roles("acme", ISSUER, frozenset(Role))
        assert (await client.get("/v1/me", headers=portals.acme.auth(**PHYSICIAN))).status == 200
