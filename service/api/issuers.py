"""`/v1/admin/issuers`: a tenant admin registers, lists and revokes the public keys its EHR portal signs
tokens with."""

from __future__ import annotations

from aiohttp import web

from schemas.issuers import (
    IssuerKeyBody,
    IssuerKeyListOut,
    IssuerKeyOut,
    IssuerKeyRevokeBody,
    IssuerKeyRevokedOut,
)
from service.api.bodies import read_json
from service.domain.principal import Role
from service.keys import ISSUERS, PRINCIPAL
from service.store.issuers import IssuerKeyRecord


async def add_issuer_key(request: web.Request) -> web.Response:
    body = await read_json(request, IssuerKeyBody)
    key = await request.app[ISSUERS].add_key_as(
        request[PRINCIPAL],
        body.issuer,
        body.public_key_pem.encode(),
        body.kid,
        roles=None if body.roles is None else frozenset(Role(name) for name in body.roles),
        endorsement=body.endorsement,
    )
    return web.json_response(_out(key).model_dump(mode="json"), status=201)


async def list_issuer_keys(request: web.Request) -> web.Response:
    keys = await request.app[ISSUERS].list_keys_as(request[PRINCIPAL])
    return web.json_response(IssuerKeyListOut(items=[_out(k) for k in keys]).model_dump(mode="json"))


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


def _out(key: IssuerKeyRecord) -> IssuerKeyOut:
    return IssuerKeyOut.model_validate(
        {
            "issuer": key.issuer,
            "kid": key.kid,
            "algorithm": key.algorithm,
            "revoked_at": key.revoked_at,
            "roles": list(key.roles),
            "registered_by": key.registered_by,
        }
    )
