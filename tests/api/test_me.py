"""`GET /v1/me`: a portal team checks its integration."""

from __future__ import annotations

import pytest

from tests.conftest import Portals


@pytest.mark.parametrize("algorithm", ["EdDSA", "ES256", "RS256"])
async def test_each_allowed_algorithm_authenticates(client, services, algorithm) -> None:
    from tests.support import TestIssuer

    await services.tenants.create("acme")
    portal = TestIssuer(tenant="acme", issuer="https://portal.acme.test", algorithm=algorithm)
    await services.issuers.add_key("acme", portal.issuer, portal.public_pem, kid=portal.kid)

    response = await client.get("/v1/me", headers=portal.auth(role="physician", sub="Practitioner/7"))

    assert response.status == 200
    assert await response.json() == {
        "tenant": "acme",
        "subject": "Practitioner/7",
        "role": "physician",
        "issuer": "https://portal.acme.test",
        "act_for": None,
    }


async def test_proxy_sees_whom_they_act_for(client, portals: Portals) -> None:
    response = await client.get(
        "/v1/me", headers=portals.acme.auth(role="proxy", sub="RelatedPerson/9", act_for="Patient/1")
    )
    assert response.status == 200
    assert (await response.json())["act_for"] == "Patient/1"
