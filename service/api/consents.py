"""`/v1/consents` and `/v1/patients/{patient_id}/consents`: the consent ledger for portals and compliance."""

from __future__ import annotations

from aiohttp import web

from schemas.consents import (
    ConsentBody,
    ConsentHistoryOut,
    ConsentHistoryQuery,
    ConsentOut,
    ConsentQuery,
    EvidenceBody,
    RevokeBody,
)
from schemas.fhir_consent import ConsentFields, to_fhir_consent
from service.api.bodies import parse_query, read_json
from service.api.headers import IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED
from service.api.paths import PATIENT_ID, path_uuid
from service.domain.consents import ConsentRequest, ConsentView, Evidence, EvidenceMethod, RevokeReason, Scope
from service.keys import CONSENTS, PRINCIPAL
from service.store.consents import ConsentEventRecord


def _evidence(body: EvidenceBody) -> Evidence:
    return Evidence(
        method=EvidenceMethod(body.method),
        text_version=body.text_version,
        document_ref=body.document_ref,
        witness=body.witness,
    )


def consent_out(record: ConsentEventRecord, status: str) -> ConsentOut:
    return ConsentOut(
        id=str(record.id),
        patient=record.key.patient,
        grantee=record.key.grantee,
        scope=record.key.scope,
        item=record.key.item,
        purpose=record.purpose,
        kind=record.kind,  # type: ignore[arg-type]
        revokes=None if record.revokes is None else str(record.revokes),
        valid_from=record.valid_from,
        valid_until=record.valid_until,
        include_sensitive=record.include_sensitive,
        evidence=record.evidence,
        reason=record.reason,
        recorded_by=record.recorded_by,
        recorded_role=record.recorded_role,
        recorded_at=record.recorded_at,
        version=record.version,
        hash=record.hash.hex(),
        status=status,  # type: ignore[arg-type]
    )


def _respond(view: ConsentView, status: int) -> web.Response:
    headers = IDEMPOTENT_REPLAYED.fixed() if view.replayed else None
    return web.json_response(
        consent_out(view.record, view.status).model_dump(mode="json"), status=status, headers=headers
    )


async def record_consent(request: web.Request) -> web.Response:
    body = await read_json(request, ConsentBody)
    consent = ConsentRequest(
        patient=body.patient,
        grantee=body.grantee,
        scope=Scope(body.scope),
        evidence=_evidence(body.evidence),
        item=body.item,
        purpose=body.purpose,
        valid_from=body.valid_from,
        valid_until=body.valid_until,
        include_sensitive=body.include_sensitive,
    )
    view = await request.app[CONSENTS].grant(request[PRINCIPAL], consent, IDEMPOTENCY_KEY.read(request))
    return _respond(view, 201)


async def revoke_consent(request: web.Request) -> web.Response:
    consent_id = path_uuid(request, "Consent")
    body = await read_json(request, RevokeBody)
    evidence = None if body.evidence is None else _evidence(body.evidence)
    view = await request.app[CONSENTS].revoke(request[PRINCIPAL], consent_id, RevokeReason(body.reason), evidence)
    return _respond(view, 200)


async def get_consent(request: web.Request) -> web.Response:
    consent_id = path_uuid(request, "Consent")
    query = parse_query(request, ConsentQuery)
    principal = request[PRINCIPAL]
    view = await request.app[CONSENTS].get(principal, consent_id)
    if query.format == "fhir":
        record = view.record
        fields = ConsentFields(
            id=str(record.id),
            tenant=principal.tenant,
            patient=record.key.patient,
            grantee=record.key.grantee,
            scope=record.key.scope,
            item=record.key.item,
            purpose=record.purpose,
            kind=record.kind,
            revokes=None if record.revokes is None else str(record.revokes),
            valid_from=record.valid_from,
            valid_until=record.valid_until,
            include_sensitive=record.include_sensitive,
            evidence=record.evidence,
            reason=record.reason,
            recorded_by=record.recorded_by,
            recorded_role=record.recorded_role,
            recorded_at=record.recorded_at,
            version=record.version,
            hash=record.hash.hex(),
            status_now=view.status,
        )
        return web.json_response(
            to_fhir_consent(fields, organization=principal.tenant), content_type="application/fhir+json"
        )
    return _respond(view, 200)


async def list_patient_consents(request: web.Request) -> web.Response:
    query = parse_query(request, ConsentHistoryQuery)
    patient = f"Patient/{PATIENT_ID.text(request)}"
    history = await request.app[CONSENTS].history(request[PRINCIPAL], patient, query.as_of)
    in_force_ids = {e.id for e in history.in_force}
    out = ConsentHistoryOut(
        patient=history.patient,
        as_of=history.as_of,
        in_force=[consent_out(e, "active") for e in history.in_force],
        history=[consent_out(e, "active" if e.id in in_force_ids else "inactive") for e in history.events],
    )
    return web.json_response(out.model_dump(mode="json"))
