"""`/v1/admin/keys`: a tenant admin's view of its data keys, rewrap, and crypto-shredding."""

from __future__ import annotations

from aiohttp import web

from schemas.keys import KekVersionOut, KeyStatusOut, RewrapOut, ShredBody, ShredOut
from service.api.bodies import read_json
from service.keys import KEY_OPERATIONS, PRINCIPAL


async def get_key_status(request: web.Request) -> web.Response:
    operations, principal = request.app[KEY_OPERATIONS], request[PRINCIPAL]
    status = await operations.status_as(principal)
    out = KeyStatusOut(
        kek_id=status.kek_id,
        primary_version=status.primary_version,
        usable_versions=list(status.usable_versions),
        wraps=[KekVersionOut(kek_id=v.kek_id, kek_version=v.kek_version, wraps=v.wraps) for v in status.wraps],
        stale_wraps=status.stale_wraps,
        live_keys=status.live_keys,
        shredded_keys=status.shredded_keys,
        rewrap_running=operations.rewrap_running(principal.tenant_id),
    )
    return web.json_response(out.model_dump())


async def rewrap_keys(request: web.Request) -> web.Response:
    started = await request.app[KEY_OPERATIONS].start_rewrap_as(request[PRINCIPAL])
    return web.json_response(RewrapOut(started=started).model_dump(), status=202)


async def shred_patient_key(request: web.Request) -> web.Response:
    body = await read_json(request, ShredBody)
    result = await request.app[KEY_OPERATIONS].shred_as(request[PRINCIPAL], body.patient, body.confirm)
    out = ShredOut(patient=result.patient, dek_id=str(result.dek_id), shredded_at=result.shredded_at)
    return web.json_response(out.model_dump(mode="json"))
