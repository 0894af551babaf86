"""Every typed key the application and its requests carry, in one place."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from service.api.metrics import HttpMetrics
from service.domain.attachments import AttachmentService
from service.domain.audit import AuditRecorder
from service.domain.audit_log import AuditQueries
from service.domain.auth import Authenticator
from service.domain.auth_failures import AuthFailures
from service.domain.consents import ConsentLedger
from service.domain.health import HealthService
from service.domain.inbound import InboundReplies
from service.domain.issuers import IssuerService
from service.domain.keys import KeyOperations
from service.domain.messaging import MessagingService
from service.domain.principal import Principal
from service.domain.webhooks import WebhookEndpoints
from service.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", HttpMetrics)
PUBLIC_ROUTES = web.AppKey[frozenset[str]]("public_routes")
OPENAPI = web.AppKey[dict[str, Any]]("openapi")
ROUTE_GATES = web.AppKey[dict[str, Callable[[Principal], bool]]]("route_gates")
AUTHENTICATOR = web.AppKey("authenticator", Authenticator)
AUTH_FAILURES = web.AppKey("auth_failures", AuthFailures)
HEALTH = web.AppKey("health", HealthService)
ISSUERS = web.AppKey("issuers", IssuerService)
KEY_OPERATIONS = web.AppKey("key_operations", KeyOperations)

AUDIT = web.AppKey("audit", AuditRecorder)
AUDIT_QUERIES = web.AppKey("audit_queries", AuditQueries)
CONSENTS = web.AppKey("consents", ConsentLedger)
MESSAGING = web.AppKey("messaging", MessagingService)
ATTACHMENTS = web.AppKey("attachments", AttachmentService)
WEBHOOKS = web.AppKey("webhooks", WebhookEndpoints)
INBOUND = web.AppKey("inbound", InboundReplies)

REQUEST_ID = web.RequestKey("request_id", str)
PRINCIPAL = web.RequestKey("principal", Principal)
# The address the request counts as coming from (`domain/client_address.py`): the audit events' source,
# the key of the failed-authentication limiter. None when aiohttp knows no peer.
CLIENT_ADDRESS = web.RequestKey[str | None]("client_address")
