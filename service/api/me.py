"""`GET /v1/me`: the authenticated caller, as the token proved it."""

from __future__ import annotations

from aiohttp import web

from schemas.me import MeOut
from service.keys import PRINCIPAL


async def get_me(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    out = MeOut(
        tenant=principal.tenant,
        subject=principal.subject,
        role=principal.role.value,
        issuer=principal.issuer,
        act_for=principal.act_for,
    )
    return web.json_response(out.model_dump())
