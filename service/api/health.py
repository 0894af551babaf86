"""Probes, metrics and the OpenAPI document: public routes that carry no patient data."""

from __future__ import annotations

from aiohttp import web

from schemas.health import HealthOut, ReadyOut
from service.errors import AuthenticationError
from service.keys import HEALTH, METRICS, OPENAPI


async def get_health(request: web.Request) -> web.Response:
    return web.json_response(HealthOut(status="ok").model_dump())


async def get_readiness(request: web.Request) -> web.Response:
    readiness = await request.app[HEALTH].readiness()
    body = ReadyOut(
        status="ready" if readiness.ready else "not-ready",
        database="unreachable" if not readiness.database else "read-only" if not readiness.takes_writes else "ok",
        schema_version="current" if readiness.schema_current else "not-current",
        audit_backlog=readiness.audit_backlog,
        audit_backlog_age_seconds=readiness.audit_backlog_age_seconds,
    )
    return web.json_response(body.model_dump(), status=200 if readiness.ready else 503)


async def get_metrics(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    authorization = request.headers.get("Authorization")
    if not metrics.allows(authorization):
        reason = "missing" if authorization is None else "metrics-token"
        raise AuthenticationError(reason, "The metrics token is missing or wrong")
    return web.Response(body=metrics.render(), headers={"Content-Type": metrics.content_type})


async def get_openapi(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI])
