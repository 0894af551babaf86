"""The route table: registration and the OpenAPI document both come from it, so they cannot drift."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web
from pydantic import BaseModel

from schemas.health import HealthOut, ReadyOut
from schemas.issuers import IssuerKeyBody, IssuerKeyListOut, IssuerKeyOut
from schemas.me import MeOut
from service.api import health, issuers, me

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    handler: Handler
    name: str
    summary: str
    tag: str
    public: bool = False
    body: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    status: int = 200
    errors: tuple[int, ...] = ()
    media_type: str = "application/json"
    query: tuple[tuple[str, str, bool], ...] = field(default=())  # (name, description, required)


ROUTES: tuple[Route, ...] = (
    Route(
        "GET",
        "/healthz",
        health.get_health,
        "get_health",
        "The process is alive",
        "operations",
        public=True,
        response=HealthOut,
    ),
    Route(
        "GET",
        "/readyz",
        health.get_readiness,
        "get_readiness",
        "The database is reachable and its schema is the one this code knows",
        "operations",
        public=True,
        response=ReadyOut,
        errors=(503,),
    ),
    Route(
        "GET",
        "/metrics",
        health.get_metrics,
        "get_metrics",
        "Prometheus metrics (by route template and status)",
        "operations",
        public=True,
        media_type="text/plain",
    ),
    Route("GET", "/openapi.json", health.get_openapi, "get_openapi", "This document", "operations", public=True),
    Route(
        "GET",
        "/v1/me",
        me.get_me,
        "get_me",
        "The authenticated caller",
        "identity",
        response=MeOut,
        errors=(401,),
    ),
    Route(
        "POST",
        "/v1/admin/issuers",
        issuers.add_issuer_key,
        "add_issuer_key",
        "Trust another public key of the tenant's token issuer (admin)",
        "administration",
        body=IssuerKeyBody,
        response=IssuerKeyOut,
        status=201,
        errors=(404, 409),
    ),
    Route(
        "GET",
        "/v1/admin/issuers",
        issuers.list_issuer_keys,
        "list_issuer_keys",
        "The tenant's trusted token issuers and their keys (admin)",
        "administration",
        response=IssuerKeyListOut,
        errors=(404,),
    ),
)


def add_routes(app: web.Application, routes: tuple[Route, ...] = ROUTES) -> frozenset[str]:
    """Register `routes`; return the names of the public ones (no token needed)."""
    for route in routes:
        app.router.add_route(route.method, route.path, route.handler, name=route.name)
    return frozenset(route.name for route in routes if route.public)
