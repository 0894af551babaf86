"""Middleware, outermost first (the order `create_app` installs them):

1. `observe`: request id, the client's address, one access log line, metrics. Sees the final status of every
   response.
2. `problems`: turns every exception into problem+json; nothing escapes as a bare 500 page.
3. `authenticate`: every route not marked public needs a valid bearer token.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from service.api.headers import X_FORWARDED_FOR, X_REQUEST_ID
from service.api.metrics import KNOWN_METHODS, UNMATCHED_ROUTE
from service.api.problems import domain_problem, http_problem, internal_problem
from service.domain.audit import REQUEST_META, AuditAction, AuditEvent, RequestMeta
from service.domain.client_address import client_address
from service.errors import (
    AuthenticationError,
    AuthenticationThrottledError,
    DomainError,
    NotFoundError,
    UnavailableError,
)
from service.keys import (
    AUDIT,
    AUTH_FAILURES,
    AUTHENTICATOR,
    CLIENT_ADDRESS,
    METRICS,
    PRINCIPAL,
    PUBLIC_ROUTES,
    REQUEST_ID,
    ROUTE_GATES,
    SETTINGS,
)

log = structlog.get_logger("bedside.http")

CANCELLED = 499  # the status logged and counted for a request cancelled before it was answered


def route_template(request: web.Request) -> str:
    """The matched route's template (`/v1/threads/{id}`), never the raw path."""
    match_info = request.match_info
    if match_info.http_exception is not None:
        return UNMATCHED_ROUTE
    resource = match_info.route.resource
    return resource.canonical if resource is not None else UNMATCHED_ROUTE


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    # The request id is always the service's own: unique, so the logs' and the audit log's events of one
    # request are that request's alone. A client's X-Request-Id cannot choose it (it could share another
    # caller's); it is kept beside it, for the client's correlation, only if it is plainly an identifier.
    incoming = request.headers.get(X_REQUEST_ID.name, "")
    client_request_id = incoming if X_REQUEST_ID.matches(incoming) else None
    request_id = uuid.uuid4().hex
    request[REQUEST_ID] = request_id
    structlog.contextvars.bind_contextvars(request_id=request_id)
    if client_request_id is not None:
        structlog.contextvars.bind_contextvars(client_request_id=client_request_id)
    # Who the request is from, found once: the audit events' source and the limiter's key. Without trusted
    # proxies it is the peer, and X-Forwarded-For is not even looked up.
    trusted = request.app[SETTINGS].trusted_proxies
    peer = request.remote
    source = client_address(peer, request.headers.getall(X_FORWARDED_FOR.name, ()), trusted) if trusted else peer
    request[CLIENT_ADDRESS] = source
    REQUEST_META.set(RequestMeta(request_id=request_id, source=source, client_request_id=client_request_id))
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        response.headers[X_REQUEST_ID.name] = request_id
        return response
    except asyncio.CancelledError:
        # Cancelled before it answered (a shutdown past its timeout): no response was sent, and nothing
        # failed in the service. 499 as in nginx's "client closed request", not a 500 that pages someone.
        status = CANCELLED
        raise
    finally:
        elapsed = time.perf_counter() - started
        route = route_template(request)
        request.app[METRICS].observe(route, request.method, status, elapsed)
        principal = request.get(PRINCIPAL)
        log.info(
            "http.request",
            method=request.method if request.method in KNOWN_METHODS else "OTHER",
            route=route,
            status=status,
            duration_ms=round(elapsed * 1000, 2),
            tenant=principal.tenant if principal else None,
            role=principal.role.value if principal else None,
        )
        structlog.contextvars.unbind_contextvars("request_id", "client_request_id")


@web.middleware
async def problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = request[REQUEST_ID]
    try:
        return await handler(request)
    except DomainError as error:
        refusals = [error.audit] if isinstance(error.audit, AuditEvent) else []
        if isinstance(error, AuthenticationError):
            log.info("auth.denied", reason=error.reason)
            refusals.append(_auth_denied(error, route_template(request)))
        for refusal in refusals:
            try:  # the refused work's transaction has ended: record its refusal now
                await _record_refusal(request, refusal)
            except UnavailableError as outage:
                # A denial that cannot be recorded is answered as an outage, not quietly.
                return domain_problem(outage, request_id)
            except AuthenticationThrottledError as throttled:
                # One past its source's budget is a 429, counted for a summary; a refused bearer token's
                # challenge goes with it.
                return domain_problem(throttled.instead_of(error), request_id)
        return domain_problem(error, request_id)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return http_problem(exc, request_id)
    except asyncio.CancelledError:
        raise
    except Exception:
        # The type and location go to the log; the message may quote stored data, so it does not.
        log.error("http.unhandled", exc_info=True)
        return internal_problem(request_id)


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    match_info = request.match_info
    if match_info.http_exception is not None or match_info.route.name in request.app[PUBLIC_ROUTES]:
        return await handler(request)
    principal = await request.app[AUTHENTICATOR].authenticate(request.headers.get("Authorization"))
    request[PRINCIPAL] = principal
    gate = request.app[ROUTE_GATES].get(match_info.route.name or "")
    if gate is not None and not gate(principal):
        denied = AuditEvent.by(
            principal, AuditAction.ACCESS_DENIED, resource_type="Route", resource_id=match_info.route.name
        ).denied("role")
        await request.app[AUDIT].record_alone(denied)
        raise NotFoundError()
    return await handler(request)


async def _record_refusal(request: web.Request, event: AuditEvent) -> None:
    """Audit a refusal. A failed authentication (a bearer token's, or a signed webhook's) goes through the
    per-source limiter: anyone can cause one, and each would be a leaf of the log for ever."""
    if event.action is AuditAction.AUTH_DENIED:
        await request.app[AUTH_FAILURES].deny(event, request[CLIENT_ADDRESS])
    else:
        await request.app[AUDIT].record_alone(event)


def _auth_denied(error: AuthenticationError, route: str) -> AuditEvent:
    event = AuditEvent(
        action=AuditAction.AUTH_DENIED,
        tenant_id=error.tenant_id,
        issuer=error.issuer,
        key_id=error.key_id,
        resource_type="Route",
        resource_id=route,
    )
    return event.denied(error.reason)


MIDDLEWARES = (observe, problems, authenticate)
