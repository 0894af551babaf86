"""`/v1/consents` and `/v1/patients/{id}/consents`: the consent ledger for portals and compliance."""

from __future__ import annotations

import uuid
from uuid import UUID

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
from service.domain.audit import AuditAction, AuditEvent
from service.domain.consents import ConsentRequest, ConsentView, Evidence, EvidenceMethod, RevokeReason, Scope
from service.errors import NotFoundError
from service.keys import CONSENTS, PRINCIPAL
from service.store.consents import ConsentEventRecord


def path_uuid(request: web.Request, resource_type: str, name: str = "id") -> UUID:
    """A path id that is not a UUID names nothing: 404, like any id that is not found, and audited like
    one (`access:denied`, reason `malformed-id`, recorded by the problem middleware) with the resource
    type and the route's name but no id: the caller's text is attacker-controlled and audit columns are
    indexed, so none of it is recorded."""
    try:
        return uuid.UUID(request.match_info[name])
    except ValueError:
        error = NotFoundError()
        principal = request.get(PRINCIPAL)
        if principal is not None:  # a signed inbound webhook has no principal: nobody to record
            denied = AuditEvent.by(
                principal,
                AuditAction.ACCESS_DENIED,
                resource_type=resource_type,
                details={"route": request.match_info.route.name or ""},
            )
            error.recording(denied.denied("malformed-id"))
        raise error from None


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
    patient = f"Patient/{request.match_info['patient_id']}"
    history = await request.app[CONSENTS].history(request[PRINCIPAL], patient, query.as_of)
    in_force_ids = {e.id for e in history.in_force}
    out = ConsentHistoryOut(
        patient=history.patient,
        as_of=history.as_of,
        in_force=[consent_out(e, "active") for e in history.in_force],
        history=[consent_out(e, "active" if e.id in in_force_ids else "inactive") for e in history.events],
    )
    return web.json_response(out.model_dump(mode="json"))
