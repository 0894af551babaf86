"""`/v1/audit/...`: the compliance officer's queries, checkpoints, proofs and export."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncGenerator
from contextlib import aclosing

from aiohttp import web

from schemas.audit import (
    AuditEventListOut,
    AuditEventOut,
    AuditEventQuery,
    AuditExportQuery,
    CheckpointOut,
    ConsistencyProofOut,
    ConsistencyProofQuery,
    InclusionProofOut,
    InclusionProofQuery,
    LeafHashesOut,
    LeafHashesQuery,
    LeafHashOut,
)
from schemas.fhir_audit import AuditEventFields, to_fhir_audit_event
from service.api.bodies import parse_query
from service.api.streaming import stream_body
from service.domain.audit import key_id_of, optional_fields, token_id_of
from service.domain.audit_verify import export_event, export_header
from service.keys import AUDIT_QUERIES, PRINCIPAL, SETTINGS
from service.store.audit import EventFilter, LeafRecord


def _filter(query: AuditEventQuery | AuditExportQuery) -> EventFilter:
    return EventFilter(
        patient=query.patient,
        actor=query.actor,
        action=query.action,
        outcome=query.outcome,
        resource_type=query.resource_type,
        resource_id=query.resource_id,
        since=query.since,
        until=query.until,
    )


def _event_out(leaf: LeafRecord) -> AuditEventOut:
    event = leaf.event
    return AuditEventOut(
        seq=leaf.seq,
        leaf_hash=leaf.leaf_hash.hex(),
        entry=base64.b64encode(event.entry).decode(),
        event_id=str(event.event_id),
        occurred_at=event.occurred_at,
        action=event.action,
        outcome=event.outcome,
        **optional_fields(event),
        token_id=token_id_of(event.entry),
        key_id=key_id_of(event.entry),
        details=json.loads(event.details),
    )


async def list_audit_events(request: web.Request) -> web.Response:
    query = parse_query(request, AuditEventQuery)
    page = await request.app[AUDIT_QUERIES].events(
        request[PRINCIPAL],
        _filter(query),
        cursor=query.cursor,
        newest_first=query.order == "newest",
        limit=query.limit,
    )
    out = AuditEventListOut(items=[_event_out(item) for item in page.items], next_cursor=page.next_cursor)
    return web.json_response(out.model_dump(mode="json"))


async def get_latest_checkpoint(request: web.Request) -> web.Response:
    queries = request.app[AUDIT_QUERIES]
    checkpoint = await queries.latest_checkpoint(request[PRINCIPAL])
    out = CheckpointOut(
        size=checkpoint.size,
        root=checkpoint.root.hex(),
        signed_at=checkpoint.signed_at,
        note=checkpoint.note,
        vkey=queries.vkey,
    )
    return web.json_response(out.model_dump(mode="json"))


async def get_inclusion_proof(request: web.Request) -> web.Response:
    query = parse_query(request, InclusionProofQuery)
    proof = await request.app[AUDIT_QUERIES].inclusion(request[PRINCIPAL], query.index, query.size)
    out = InclusionProofOut(
        index=proof.index, size=proof.size, leaf_hash=proof.leaf_hash.hex(), proof=[p.hex() for p in proof.path]
    )
    return web.json_response(out.model_dump(mode="json"))


async def get_consistency_proof(request: web.Request) -> web.Response:
    query = parse_query(request, ConsistencyProofQuery)
    proof = await request.app[AUDIT_QUERIES].consistency(request[PRINCIPAL], query.from_, query.to)
    out = ConsistencyProofOut(from_=query.from_, to=query.to, proof=[p.hex() for p in proof])
    return web.json_response(out.model_dump(mode="json", by_alias=True))


async def list_leaf_hashes(request: web.Request) -> web.Response:
    query = parse_query(request, LeafHashesQuery)
    hashes = await request.app[AUDIT_QUERIES].leaf_hashes(request[PRINCIPAL], query.start, query.end)
    out = LeafHashesOut(items=[LeafHashOut(index=i, leaf_hash=h.hex()) for i, h in hashes])
    return web.json_response(out.model_dump(mode="json"))


async def export_audit_events(request: web.Request) -> web.StreamResponse:
    query = parse_query(request, AuditExportQuery)
    queries = request.app[AUDIT_QUERIES]
    principal = request[PRINCIPAL]
    checkpoint, rows = await queries.export(principal, _filter(query))
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    observer = request.app[SETTINGS].audit_origin

    async def lines() -> AsyncGenerator[bytes, None]:
        async with aclosing(rows) as leaves:
            if query.format == "ndjson" and checkpoint is not None:
                yield (json.dumps(export_header(checkpoint, queries.vkey)) + "\n").encode()
            async for leaf, proof in leaves:
                if query.format == "fhir":
                    line = to_fhir_audit_event(_fhir_fields(leaf, principal.tenant), observer=observer)
                else:
                    line = export_event(leaf, proof.path)
                yield (json.dumps(line) + "\n").encode()

    return await stream_body(request, response, lines(), event="audit.export")


def _fhir_fields(leaf: LeafRecord, tenant: str) -> AuditEventFields:
    event = leaf.event
    return AuditEventFields(
        seq=leaf.seq,
        leaf_hash=leaf.leaf_hash.hex(),
        event_id=str(event.event_id),
        occurred_at=event.occurred_at,
        tenant=tenant,
        action=event.action,
        outcome=event.outcome,
        **optional_fields(event),
        token_id=token_id_of(event.entry),
        key_id=key_id_of(event.entry),
        details=json.loads(event.details),
    )
