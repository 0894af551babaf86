"""Refusals cannot stop the service or its audit log: odd input in a path, and many refusals at once."""

from __future__ import annotations

import asyncio

import asyncpg

from tests.api.messaging_helpers import consent, patient, thread
from tests.conftest import Portals


async def _integrated(client) -> None:
    for _ in range(200):
        if not (await (await client.get("/readyz")).json())["audit_backlog"]:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the audit backlog did not drain")


async def test_an_odd_patient_in_a_path_is_refused_and_the_log_keeps_moving(client, portals: Portals, database) -> None:
    compliance = portals.acme.auth(role="compliance", sub="Practitioner/c1")
    for odd in ("x" * 5000, "1%00", "%F0%9F%92%A9" * 50):
        response = await client.get(f"/v1/patients/{odd}/consents", headers=compliance)
        assert response.status == 404
    await _integrated(client)  # the sequencer integrated every refusal: nothing poisoned it
    owner = await asyncpg.connect(database.owner)
    try:
        patients = {
            r["patient"] for r in await owner.fetch("SELECT patient FROM audit_leaves WHERE action = 'access:denied'")
        }
    finally:
        await owner.close()
    assert patients <= {None, "<invalid>"}


async def test_many_refusals_at_once_do_not_exhaust_the_pool(client, portals: Portals, settings) -> None:
    assert settings.db_pool_max <= 4  # far fewer connections than concurrent refusals
    await consent(client, portals)
    created = await thread(client, portals)
    outsider = portals.acme.auth(role="patient", sub="Patient/2")
    url = f"/v1/threads/{created['id']}/messages"
    responses = await asyncio.wait_for(
        asyncio.gather(*(client.post(url, json={"body": "let me in"}, headers=outsider) for _ in range(40))),
        timeout=60,
    )
    assert {r.status for r in responses} == {404}
    assert (await client.get(url, headers=patient(portals))).status == 200  # and the service still serves
