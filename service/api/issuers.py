"""`/v1/admin/issuers`: a tenant admin registers, lists and revokes the public keys its EHR portal signs
tokens with."""

from __future__ import annotations

from aiohttp import web

from schemas.issuers import IssuerKeyBody, IssuerKeyListOut, IssuerKeyOut, IssuerKeyRevokeBody, IssuerKeyRevokedOut
from service.api.bodies import read_json
from service.keys import ISSUERS, PRINCIPAL


async def add_issuer_key(request: web.Request) -> web.Response:
    body = await read_json(request, IssuerKeyBody)
    key = await request.app[ISSUERS].add_key_as(request[PRINCIPAL], body.issuer, body.public_key_pem.encode(), body.kid)
    out = IssuerKeyOut(issuer=key.issuer, kid=key.kid, algorithm=key.algorithm)
    return web.json_response(out.model_dump(), status=201)


async def list_issuer_keys(request: web.Request) -> web.Response:
    keys = await request.app[ISSUERS].list_keys_as(request[PRINCIPAL])
    out = IssuerKeyListOut(
        items=[IssuerKeyOut(issuer=k.issuer, kid=k.kid, algorithm=k.algorithm, revoked_at=k.revoked_at) for k in keys]
    )
    return web.json_response(out.model_dump(mode="json"))


async def revoke_issuer_key(request: web.Request) -> web.Response:
    body = await read_json(request, IssuerKeyRevokeBody)
    revocation = await request.app[ISSUERS].revoke_key_as(request[PRINCIPAL], body.issuer, body.kid)
    key = revocation.key
    out = IssuerKeyRevokedOut(
        issuer=key.issuer,
        kid=key.kid,
        algorithm=key.algorithm,
        revoked_at=revocation.revoked_at,
        active_keys=revocation.active_keys,
    )
    return web.json_response(out.model_dump(mode="json"))
