"""The consent API as portals and compliance officers use it."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from tests.conftest import Portals
from tests.support import audit_events

PORTAL = {"method": "portal", "text_version": "consent-text-v3"}


def consent(grantee: str = "Practitioner/7", **extra) -> dict:
    return {"patient": "Patient/1", "grantee": grantee, "scope": "messaging", "evidence": PORTAL, **extra}


async def test_a_patient_records_and_revokes_their_own_consent(client, portals: Portals) -> None:
    patient = portals.acme.auth(role="patient", sub="Patient/1")
    created = await client.post("/v1/consents", json=consent(), headers=patient)
    assert created.status == 201
    body = await created.json()
    assert (body["kind"], body["status"], body["recorded_by"]) == ("grant", "active", "Patient/1")
    assert len(body["hash"]) == 64

    revoked = await client.post(
        f"/v1/consents/{body['id']}/revoke", json={"reason": "patient-request"}, headers=patient
    )
    assert revoked.status == 200
    assert (await revoked.json())["revokes"] == body["id"]
    again = await client.post(f"/v1/consents/{body['id']}/revoke", json={"reason": "patient-request"}, headers=patient)
    assert again.status == 409


async def test_idempotent_recording(client, portals: Portals) -> None:
    headers = {**portals.acme.auth(role="patient", sub="Patient/1"), "Idempotency-Key": "portal-click-42"}
    first = await client.post("/v1/consents", json=consent(), headers=headers)
    second = await client.post("/v1/consents", json=consent(), headers=headers)
    assert (first.status, second.status) == (201, 201)
    assert (await first.json())["id"] == (await second.json())["id"]
    assert second.headers["Idempotent-Replayed"] == "true"
    different = await client.post("/v1/consents", json=consent("Practitioner/8"), headers=headers)
    assert different.status == 422
    assert (await different.json())["errors"][0]["loc"] == ["Idempotency-Key"]


async def test_bad_consents_are_422_and_name_the_field(client, portals: Portals) -> None:
    patient = portals.acme.auth(role="patient", sub="Patient/1")
    unknown_scope = await client.post("/v1/consents", json=consent(scope="telepathy"), headers=patient)
    assert unknown_scope.status == 422
    assert (await unknown_scope.json())["errors"][0]["loc"] == ["scope"]
    far = (datetime.now(UTC) + timedelta(days=800)).isoformat()
    proxy = consent("RelatedPerson/mum", scope="proxy", valid_until=far)
    too_long = await client.post("/v1/consents", json=proxy, headers=patient)
    assert too_long.status == 422
    assert (await too_long.json())["errors"][0]["type"] == "proxy-validity"
    naive = await client.post("/v1/consents", json=consent(valid_from="2026-01-01T00:00:00"), headers=patient)
    assert naive.status == 422


async def test_who_may_record_for_a_patient(client, portals: Portals) -> None:
    other_patient = portals.acme.auth(role="patient", sub="Patient/2")
    assert (await client.post("/v1/consents", json=consent(), headers=other_patient)).status == 404
    nurse = portals.acme.auth(role="staff", sub="Practitioner/nurse")
    assert (await client.post("/v1/consents", json=consent(), headers=nurse)).status == 404
    paper = consent(evidence={"method": "paper", "document_ref": "scan-1"})
    assert (await client.post("/v1/consents", json=paper, headers=nurse)).status == 201
    verbal = consent(evidence={"method": "verbal", "witness": "Practitioner/w1"})
    doctor = portals.acme.auth(role="physician", sub="Practitioner/7")
    assert (await client.post("/v1/consents", json=verbal, headers=doctor)).status == 201


async def test_a_clinician_cannot_witness_the_consent_they_record(client, portals: Portals) -> None:
    doctor = portals.acme.auth(role="physician", sub="Practitioner/7")
    to_self = consent(grantee="Practitioner/7", evidence={"method": "verbal", "witness": "Practitioner/7"})
    refused = await client.post("/v1/consents", json=to_self, headers=doctor)
    assert refused.status == 422
    problem = await refused.json()
    assert [(e["loc"], e["type"]) for e in problem["errors"]] == [(["evidence", "witness"], "witness")]
    listed = await client.get("/v1/patients/1/consents", headers=portals.acme.auth(role="patient", sub="Patient/1"))
    assert (await listed.json())["history"] == []
    # Witnessed by a colleague, the same grant is on record.
    witnessed = consent(grantee="Practitioner/7", evidence={"method": "verbal", "witness": "Practitioner/8"})
    granted = await client.post("/v1/consents", json=witnessed, headers=doctor)
    assert granted.status == 201
    # And a revocation on verbal evidence is witnessed by someone else too.
    nurse = portals.acme.auth(role="staff", sub="Practitioner/nurse")
    self_witnessed = {"reason": "patient-request", "evidence": {"method": "verbal", "witness": "Practitioner/nurse"}}
    revoke = await client.post(
        f"/v1/consents/{(await granted.json())['id']}/revoke", json=self_witnessed, headers=nurse
    )
    assert revoke.status == 422


async def test_history_and_as_of(client, portals: Portals) -> None:
    patient = portals.acme.auth(role="patient", sub="Patient/1")
    created = await (await client.post("/v1/consents", json=consent(), headers=patient)).json()
    between = datetime.now(UTC).isoformat()
    await client.post(f"/v1/consents/{created['id']}/revoke", json={"reason": "care-ended"}, headers=patient)

    now = await (await client.get("/v1/patients/1/consents", headers=patient)).json()
    assert now["in_force"] == []
    assert [e["kind"] for e in now["history"]] == ["grant", "revoke"]
    then = await (await client.get("/v1/patients/1/consents", params={"as_of": between}, headers=patient)).json()
    assert [e["id"] for e in then["in_force"]] == [created["id"]]

    compliance = portals.acme.auth(role="compliance", sub="Practitioner/c1")
    assert (await client.get("/v1/patients/1/consents", headers=compliance)).status == 200
    assert (
        await client.get("/v1/patients/1/consents", headers=portals.acme.auth(role="patient", sub="Patient/2"))
    ).status == 404
    globex = await client.get(
        "/v1/patients/1/consents", headers=portals.globex.auth(role="compliance", sub="Practitioner/c9")
    )
    assert (await globex.json())["history"] == []  # another tenant's Patient/1 is another person


async def test_a_consent_as_fhir_validates(client, portals: Portals) -> None:
    from fhir.resources.R4B.consent import Consent

    patient = portals.acme.auth(role="patient", sub="Patient/1")
    created = await (await client.post("/v1/consents", json=consent(), headers=patient)).json()
    response = await client.get(f"/v1/consents/{created['id']}", params={"format": "fhir"}, headers=patient)
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("application/fhir+json")
    resource = Consent.model_validate(await response.json())
    assert resource.status == "active"
    assert resource.patient.reference == "Patient/1"
    assert (await client.get("/v1/consents/not-a-uuid", headers=patient)).status == 404


async def test_staff_revoke_only_on_witnessed_evidence(client, portals: Portals) -> None:
    patient = portals.acme.auth(role="patient", sub="Patient/1")
    created = await (await client.post("/v1/consents", json=consent(), headers=patient)).json()
    url = f"/v1/consents/{created['id']}/revoke"
    nurse = portals.acme.auth(role="staff", sub="Practitioner/nurse")
    for unwitnessed in ({"reason": "patient-request"}, {"reason": "patient-request", "evidence": PORTAL}):
        assert (await client.post(url, json=unwitnessed, headers=nurse)).status == 404
    assert (await (await client.get(f"/v1/consents/{created['id']}", headers=patient)).json())["status"] == "active"
    paper = {"reason": "patient-request", "evidence": {"method": "paper", "document_ref": "scan-7"}}
    assert (await client.post(url, json=paper, headers=nurse)).status == 200
    assert (await (await client.get(f"/v1/consents/{created['id']}", headers=patient)).json())["status"] == "inactive"


async def test_reading_consents_is_audited_with_who_read_which_patients(client, portals: Portals, database) -> None:
    patient = portals.acme.auth(role="patient", sub="Patient/1")
    created = await (await client.post("/v1/consents", json=consent(), headers=patient)).json()
    await client.post("/v1/consents", json=consent("Practitioner/8"), headers=patient)
    revoke = {"reason": "care-ended"}
    assert (await client.post(f"/v1/consents/{created['id']}/revoke", json=revoke, headers=patient)).status == 200
    compliance = portals.acme.auth(role="compliance", sub="Practitioner/c1")
    assert (await client.get("/v1/patients/1/consents", headers=compliance)).status == 200
    assert (await client.get(f"/v1/consents/{created['id']}", headers=patient)).status == 200

    reads = await audit_events(database.owner, "action = 'consent:read'")
    assert [(e["actor"], e["patient"], e["resource_id"], json.loads(e["details"])) for e in reads] == [
        ("Practitioner/c1", "Patient/1", None, {"events": 3}),  # the whole history
        ("Patient/1", "Patient/1", created["id"], {}),
    ]
