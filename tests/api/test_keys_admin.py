"""`/v1/admin/keys`: a tenant admin's key status, background rewrap, and crypto-shredding."""

from __future__ import annotations

import asyncio

import pytest

from service.api.problems import domain_problem
from service.errors import ShreddedError
from tests.conftest import Portals, Services

ADMIN = {"role": "admin", "sub": "Practitioner/admin1"}


async def _seal(services: Services, slug: str, patient: str) -> bytes:
    tenant = await services.tenants.get(slug)
    async with services.db.transaction(tenant.id) as tx:
        return await services.keyring.seal_for(tx, patient, b"content", {"column": "test.body"})


@pytest.mark.parametrize("role", ["patient", "physician", "staff", "compliance"])
async def test_only_an_admin_sees_the_key_routes(client, portals: Portals, role: str) -> None:
    sub = {"patient": "Patient/1"}.get(role, "Practitioner/1")
    headers = portals.acme.auth(role=role, sub=sub)
    for method, path in (("GET", "/v1/admin/keys"), ("POST", "/v1/admin/keys/rewrap")):
        response = await client.request(method, path, headers=headers)
        assert response.status == 404
    response = await client.post(
        "/v1/admin/keys/shred", json={"patient": "Patient/1", "confirm": "Patient/1"}, headers=headers
    )
    assert response.status == 404


async def test_status_counts_only_the_admins_tenant(client, portals: Portals, services: Services) -> None:
    await _seal(services, "acme", "Patient/1")
    await _seal(services, "acme", "Patient/2")
    await _seal(services, "globex", "Patient/1")

    response = await client.get("/v1/admin/keys", headers=portals.acme.auth(**ADMIN))

    assert response.status == 200
    body = await response.json()
    assert body["live_keys"] == 2
    assert body["shredded_keys"] == 0
    assert [(v["kek_version"], v["wraps"]) for v in body["wraps"]] == [(1, 2)]
    assert body["stale_wraps"] == 0
    assert body["rewrap_running"] is False


async def test_admin_rewrap_moves_the_tenants_keys_to_the_new_version(
    client, portals: Portals, services: Services
) -> None:
    for n in range(3):
        await _seal(services, "acme", f"Patient/{n}")
    await services.keys.add_kek_version()  # the operator's `bedside keys rotate`
    headers = portals.acme.auth(**ADMIN)

    response = await client.post("/v1/admin/keys/rewrap", headers=headers)
    assert response.status == 202
    assert (await response.json())["started"] is True
    for _ in range(100):
        body = await (await client.get("/v1/admin/keys", headers=headers)).json()
        if body["stale_wraps"] == 0 and not body["rewrap_running"]:
            break
        await asyncio.sleep(0.05)
    assert [(v["kek_version"], v["wraps"]) for v in body["wraps"]] == [(2, 3)]


async def test_admin_shreds_a_patient_with_confirmation(client, portals: Portals, services: Services) -> None:
    sealed = await _seal(services, "acme", "Patient/1")
    headers = portals.acme.auth(**ADMIN)

    refused = await client.post(
        "/v1/admin/keys/shred", json={"patient": "Patient/1", "confirm": "Patient/2"}, headers=headers
    )
    assert refused.status == 422
    assert (await refused.json())["errors"][0]["loc"] == ["confirm"]

    done = await client.post(
        "/v1/admin/keys/shred", json={"patient": "Patient/1", "confirm": "Patient/1"}, headers=headers
    )
    assert done.status == 200
    body = await done.json()
    assert body["patient"] == "Patient/1"
    assert body["shredded_at"]

    again = await client.post(
        "/v1/admin/keys/shred", json={"patient": "Patient/1", "confirm": "Patient/1"}, headers=headers
    )
    assert again.status == 409
    tenant = await services.tenants.get("acme")
    async with services.db.transaction(tenant.id) as tx:
        with pytest.raises(ShreddedError):
            await services.keyring.open(tx, sealed, {"column": "test.body"})


async def test_an_admin_cannot_shred_another_tenants_patient(client, portals: Portals, services: Services) -> None:
    await _seal(services, "globex", "Patient/1")
    response = await client.post(
        "/v1/admin/keys/shred",
        json={"patient": "Patient/1", "confirm": "Patient/1"},
        headers=portals.acme.auth(**ADMIN),
    )
    assert response.status == 404
    assert (await services.keys.status("globex")).live_keys == 1


def test_shredded_content_reads_as_410_gone_with_its_tombstone() -> None:
    import json
    from datetime import UTC, datetime

    when = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
    response = domain_problem(ShreddedError(when), "req-1")
    assert response.status == 410
    body = json.loads(response.body)
    assert body["code"] == "content-shredded"
    assert body["shredded_at"] == "2026-11-21T12:00:00Z"


async def test_a_non_admin_learns_nothing_from_an_admin_route(client, portals: Portals) -> None:
    headers = portals.acme.auth(role="patient", sub="Patient/1")
    hidden = await client.post(
        "/v1/admin/issuers", data=b"{not json", headers={**headers, "Content-Type": "text/plain"}
    )
    missing = await client.post("/v1/admin/nothing-here", data=b"{}", headers=headers)

    assert hidden.status == missing.status == 404
    strip = lambda body: {k: v for k, v in body.items() if k != "request_id"}  # noqa: E731
    assert strip(await hidden.json()) == strip(await missing.json())
