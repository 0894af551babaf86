"""Every typed key the application and its requests carry, in one place."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from service.api.metrics import HttpMetrics
from service.domain.auth import Authenticator
from service.domain.health import HealthService
from service.domain.issuers import IssuerService
from service.domain.principal import Principal
from service.domain.tenants import TenantService
from service.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", HttpMetrics)
PUBLIC_ROUTES = web.AppKey[frozenset[str]]("public_routes")
OPENAPI = web.AppKey[dict[str, Any]]("openapi")
AUTHENTICATOR = web.AppKey("authenticator", Authenticator)
HEALTH = web.AppKey("health", HealthService)
TENANTS = web.AppKey("tenants", TenantService)
ISSUERS = web.AppKey("issuers", IssuerService)

REQUEST_ID = web.RequestKey("request_id", str)
PRINCIPAL = web.RequestKey("principal", Principal)
