"""The route table: registration and the OpenAPI document both come from it, so they cannot drift."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from pydantic import BaseModel

from schemas.attachments import AttachmentOut, AttachmentUploadQuery
from schemas.audit import (
    AuditEventListOut,
    AuditEventQuery,
    AuditExportQuery,
    CheckpointOut,
    ConsistencyProofOut,
    ConsistencyProofQuery,
    InclusionProofOut,
    InclusionProofQuery,
    LeafHashesOut,
    LeafHashesQuery,
)
from schemas.consents import ConsentBody, ConsentHistoryOut, ConsentHistoryQuery, ConsentOut, ConsentQuery, RevokeBody
from schemas.health import HealthOut, ReadyOut
from schemas.issuers import IssuerKeyBody, IssuerKeyListOut, IssuerKeyOut, IssuerKeyRevokeBody, IssuerKeyRevokedOut
from schemas.keys import KeyStatusOut, RewrapOut, ShredBody, ShredOut
from schemas.me import MeOut
from schemas.messaging import (
    BreakGlassListOut,
    BreakGlassQuery,
    CareTeamBody,
    CareTeamMembersBody,
    CareTeamOut,
    MessageBody,
    MessageListOut,
    MessageListQuery,
    MessageOut,
    ReadBody,
    ReceiptOut,
    ThreadBody,
    ThreadListOut,
    ThreadListQuery,
    ThreadOut,
)
from schemas.webhooks import (
    DeliveryListOut,
    DeliveryOut,
    DeliveryQuery,
    EndpointBody,
    EndpointCreatedOut,
    EndpointEnabledOut,
    EndpointListOut,
    EndpointOut,
    EndpointPatchBody,
    EndpointQuery,
    InboundReplyBody,
    InboundReplyOut,
    RecoverBody,
    RecoveredOut,
    RotateBody,
    SecretsOut,
)
from service.api import attachments, audit, consents, health, issuers, keys, me, messaging, webhooks
from service.api.bodies import max_json_bytes
from service.api.headers import (
    BREAK_GLASS_REASON,
    CONTENT_DISPOSITION,
    FILE_NAME,
    IDEMPOTENCY_KEY,
    IDEMPOTENT_REPLAYED,
    NO_SNIFF,
    NO_STORE,
    SANDBOX,
    WEBHOOK_HEADERS,
    Header,
)
from service.domain import policy
from service.domain.attachments import CONTENT_TYPES
from service.domain.principal import Principal
from service.settings import Settings

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class RawBody:
    """A request body that is not JSON but a file, taken as it is: its media types (what the domain accepts)
    and its size limit (from the settings)."""

    media_types: tuple[str, ...]
    max_bytes: Callable[[Settings], int]
    description: str


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    handler: Handler
    name: str
    summary: str
    tag: str
    public: bool = False
    # The credential is a webhook signature over the request, not a bearer token: its 401 has no challenge.
    signed: bool = False
    body: type[BaseModel] | None = None
    # The JSON body's size limit, from the settings: the one the handler enforces (`read_json`'s, unless it
    # reads the body itself).
    max_body_bytes: Callable[[Settings], int] = max_json_bytes
    response: type[BaseModel] | None = None
    status: int = 200
    errors: tuple[int, ...] = ()
    media_type: str = "application/json"
    # A success answer that is a stored file, served as its own media type: one of these.
    file_types: tuple[str, ...] | None = None
    # The model the handler parses the query string with (`parse_query`): the document's parameters, their
    # types and bounds come from it.
    query: type[BaseModel] | None = None
    # Request headers the handler reads (through the same declarations) and headers its success answer carries.
    headers: tuple[Header, ...] = ()
    response_headers: tuple[Header, ...] = ()
    raw_body: RawBody | None = None
    # Non-2xx answers whose body is a model rather than a problem (readiness says why it is not ready).
    other_responses: tuple[tuple[int, type[BaseModel]], ...] = ()
    # A first, coarse policy check made before the body is read: a caller it refuses gets the same 404
    # as for a route that does not exist, and learns nothing of the body's schema. The domain checks
    # again (defence in depth).
    gate: Callable[[Principal], bool] | None = None

    @property
    def query_names(self) -> tuple[str, ...]:
        """The query parameters the route takes, as sent."""
        if self.query is None:
            return ()
        return tuple(field.alias or name for name, field in self.query.model_fields.items())


def _attachment_bytes(settings: Settings) -> int:
    return settings.max_attachment_bytes


IDEMPOTENT = (IDEMPOTENCY_KEY,)
REPLAYED = (IDEMPOTENT_REPLAYED,)
NOT_CACHED = (NO_STORE,)  # webhook administration: secrets are shown once, and the rest is a current view


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
        other_responses=((503, ReadyOut),),
    ),
    Route(
        "GET",
        "/metrics",
        health.get_metrics,
        "get_metrics",
        "Prometheus metrics (by route template and status); with BEDSIDE_METRICS_TOKEN set, only with that "
        "bearer token (not a portal's token)",
        "operations",
        public=True,
        errors=(401,),
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
        "Trust a public key of a token issuer of the tenant (admin): a key for an existing issuer needs an "
        "endorsement signed by one of its active keys (403 endorsement-required, endorsement-invalid) and "
        "leaves its roles as they are; a new issuer is registered with roles within BEDSIDE_ADMIN_ISSUER_ROLES "
        "(403 issuer-roles-not-allowed); a key trusted already under another kid or issuer of the tenant is "
        "refused (409 key-in-use), and so is a revoked one (409 key-revoked)",
        "administration",
        gate=policy.can_manage_issuers,
        body=IssuerKeyBody,
        response=IssuerKeyOut,
        status=201,
        errors=(403, 404, 409),
    ),
    Route(
        "GET",
        "/v1/admin/issuers",
        issuers.list_issuer_keys,
        "list_issuer_keys",
        "The tenant's token issuers and their keys, revoked ones with `revoked_at`, each with its issuer's "
        "roles and who registered the issuer (admin)",
        "administration",
        gate=policy.can_manage_issuers,
        response=IssuerKeyListOut,
        errors=(404,),
    ),
    Route(
        "POST",
        "/v1/admin/issuers/revoke",
        issuers.revoke_issuer_key,
        "revoke_issuer_key",
        "Revoke a key of one of the tenant's token issuers: its tokens are refused at once by this process, "
        "within BEDSIDE_ISSUER_CACHE_SECONDS by the others, under every kid and issuer the key has in the "
        "tenant. Revoking a revoked key answers the same; the last key of an issuer may be revoked (admin)",
        "administration",
        gate=policy.can_manage_issuers,
        body=IssuerKeyRevokeBody,
        response=IssuerKeyRevokedOut,
        errors=(404,),
    ),
    Route(
        "GET",
        "/v1/admin/keys",
        keys.get_key_status,
        "get_key_status",
        "The tenant's data keys by KEK version (admin)",
        "administration",
        gate=policy.can_manage_keys,
        response=KeyStatusOut,
        errors=(404,),
    ),
    Route(
        "POST",
        "/v1/admin/keys/rewrap",
        keys.rewrap_keys,
        "rewrap_keys",
        "Rewrap the tenant's data keys under the primary KEK version, in the background (admin)",
        "administration",
        gate=policy.can_manage_keys,
        response=RewrapOut,
        status=202,
        errors=(404,),
    ),
    Route(
        "POST",
        "/v1/admin/keys/shred",
        keys.shred_patient_key,
        "shred_patient_key",
        "Crypto-shred a patient: destroy their data key, irreversibly (admin)",
        "administration",
        gate=policy.can_manage_keys,
        body=ShredBody,
        response=ShredOut,
        errors=(404, 409),
    ),
    Route(
        "GET",
        "/v1/audit/events",
        audit.list_audit_events,
        "list_audit_events",
        "The tenant's audit events, filtered, newest or oldest first, cursor-paginated (compliance)",
        "audit",
        gate=policy.can_query_audit,
        response=AuditEventListOut,
        errors=(404, 422),
        query=AuditEventQuery,
    ),
    Route(
        "GET",
        "/v1/audit/checkpoints/latest",
        audit.get_latest_checkpoint,
        "get_latest_checkpoint",
        "The latest signed checkpoint of the Merkle log, and the log's public key (compliance)",
        "audit",
        gate=policy.can_query_audit,
        response=CheckpointOut,
        errors=(404,),
    ),
    Route(
        "GET",
        "/v1/audit/proofs/inclusion",
        audit.get_inclusion_proof,
        "get_inclusion_proof",
        "RFC 9162 inclusion proof of leaf `index` in the tree of `size` leaves (compliance)",
        "audit",
        gate=policy.can_query_audit,
        response=InclusionProofOut,
        errors=(404, 422),
        query=InclusionProofQuery,
    ),
    Route(
        "GET",
        "/v1/audit/proofs/consistency",
        audit.get_consistency_proof,
        "get_consistency_proof",
        "RFC 9162 consistency proof between the trees of `from` and `to` leaves (compliance)",
        "audit",
        gate=policy.can_query_audit,
        response=ConsistencyProofOut,
        errors=(404, 422),
        query=ConsistencyProofQuery,
    ),
    Route(
        "GET",
        "/v1/audit/leaves",
        audit.list_leaf_hashes,
        "list_leaf_hashes",
        "Leaf hashes of [start, end), at most 10,000, to recompute roots independently (compliance)",
        "audit",
        gate=policy.can_query_audit,
        response=LeafHashesOut,
        errors=(404, 422),
        query=LeafHashesQuery,
    ),
    Route(
        "GET",
        "/v1/audit/export",
        audit.export_audit_events,
        "export_audit_events",
        "Stream the tenant's events as NDJSON with inclusion proofs (verifiable offline), or as FHIR R4 "
        "AuditEvent resources (compliance)",
        "audit",
        gate=policy.can_query_audit,
        media_type="application/x-ndjson",
        errors=(404, 422),
        query=AuditExportQuery,
    ),
    Route(
        "POST",
        "/v1/consents",
        consents.record_consent,
        "record_consent",
        "Record a consent grant: the patient their own, staff or a physician with paper or verbal evidence. "
        "Idempotent with an Idempotency-Key header",
        "consent",
        body=ConsentBody,
        response=ConsentOut,
        status=201,
        headers=IDEMPOTENT,
        response_headers=REPLAYED,
        errors=(404, 409),
    ),
    Route(
        "POST",
        "/v1/consents/{id}/revoke",
        consents.revoke_consent,
        "revoke_consent",
        "Revoke a consent in force: the patient, their proxy (messaging only), or staff with evidence",
        "consent",
        body=RevokeBody,
        response=ConsentOut,
        errors=(404, 409),
    ),
    Route(
        "GET",
        "/v1/consents/{id}",
        consents.get_consent,
        "get_consent",
        "One consent event, as JSON or as a FHIR R4 Consent (`format=fhir`)",
        "consent",
        response=ConsentOut,
        errors=(404, 422),
        query=ConsentQuery,
    ),
    Route(
        "GET",
        "/v1/patients/{patient_id}/consents",
        consents.list_patient_consents,
        "list_patient_consents",
        "What was in force at `as_of` (default now) and the full history: the patient, or compliance",
        "consent",
        response=ConsentHistoryOut,
        errors=(404, 422),
        query=ConsentHistoryQuery,
    ),
    Route(
        "POST",
        "/v1/threads",
        messaging.create_thread,
        "create_thread",
        "Start a thread between a patient and practitioners or care teams (their messaging consent required), "
        "optionally with a first message",
        "messaging",
        body=ThreadBody,
        response=ThreadOut,
        status=201,
        headers=IDEMPOTENT,
        response_headers=REPLAYED,
        errors=(403, 404, 409),
    ),
    Route(
        "GET",
        "/v1/threads",
        messaging.list_threads,
        "list_threads",
        "The caller's threads, newest first (by creation: pages never skip or repeat), with unread counts",
        "messaging",
        response=ThreadListOut,
        errors=(422,),
        query=ThreadListQuery,
    ),
    Route(
        "GET",
        "/v1/threads/{id}",
        messaging.get_thread,
        "get_thread",
        "One thread with its receipts; a physician outside it may read it with a Break-Glass-Reason header",
        "messaging",
        response=ThreadOut,
        headers=(BREAK_GLASS_REASON,),
        errors=(404, 410, 422),
    ),
    Route(
        "POST",
        "/v1/threads/{id}/close",
        messaging.close_thread,
        "close_thread",
        "Close a thread: no more messages",
        "messaging",
        response=ThreadOut,
        errors=(404, 409),
    ),
    Route(
        "POST",
        "/v1/threads/{id}/messages",
        messaging.send_message,
        "send_message",
        "Send a message (Idempotency-Key: the same key and body return the first response)",
        "messaging",
        body=MessageBody,
        response=MessageOut,
        status=201,
        headers=IDEMPOTENT,
        response_headers=REPLAYED,
        errors=(403, 404, 409, 410, 422),
    ),
    Route(
        "GET",
        "/v1/threads/{id}/messages",
        messaging.list_messages,
        "list_messages",
        "Messages by sequence: the latest `limit` (before `before`), or the next after `after`",
        "messaging",
        response=MessageListOut,
        headers=(BREAK_GLASS_REASON,),
        errors=(404, 410, 422),
        query=MessageListQuery,
    ),
    Route(
        "GET",
        "/v1/messages/{id}",
        messaging.get_message,
        "get_message",
        "One message",
        "messaging",
        response=MessageOut,
        errors=(404, 410),
    ),
    Route(
        "POST",
        "/v1/threads/{id}/read",
        messaging.mark_read,
        "mark_read",
        "Record that the caller has read up to a sequence number",
        "messaging",
        body=ReadBody,
        response=ReceiptOut,
        errors=(404,),
    ),
    Route(
        "POST",
        "/v1/messages/{id}/recall",
        messaging.recall_message,
        "recall_message",
        "The sender recalls a message: within the recall window and before anyone else read it",
        "messaging",
        response=MessageOut,
        errors=(404, 409),
    ),
    Route(
        "POST",
        "/v1/attachments",
        attachments.upload_attachment,
        "upload_attachment",
        "Upload a file into a thread as the raw body, of a media type the body lists (checked against the "
        "content; text as UTF-8): streamed, sealed in chunks, stored all or nothing. The file name goes in the "
        "Bedside-File-Name header, never in the URL",
        "messaging",
        response=AttachmentOut,
        status=201,
        errors=(400, 403, 404, 408, 409, 410, 413, 415, 422, 429, 503),
        query=AttachmentUploadQuery,
        headers=(FILE_NAME,),
        raw_body=RawBody(
            CONTENT_TYPES,
            _attachment_bytes,
            "The file itself, as it is (not multipart); its Content-Type one of these, and for text/plain "
            "UTF-8 or US-ASCII",
        ),
    ),
    Route(
        "GET",
        "/v1/attachments/{id}",
        attachments.download_attachment,
        "download_attachment",
        "Download an attachment (whoever may read its thread, break-glass included), verified whole before "
        "the first byte is sent; served as its stored type, as a download, never sniffed or cached",
        "messaging",
        file_types=CONTENT_TYPES,
        response_headers=(CONTENT_DISPOSITION, NO_SNIFF, NO_STORE, SANDBOX),
        errors=(404, 410),
    ),
    Route(
        "GET",
        "/v1/audit/break-glass",
        messaging.list_break_glass,
        "list_break_glass",
        "Break-glass accesses for review, with their reasons (compliance)",
        "audit",
        gate=policy.can_review_break_glass,
        response=BreakGlassListOut,
        errors=(404,),
        query=BreakGlassQuery,
    ),
    Route(
        "POST",
        "/v1/audit/break-glass/{id}/review",
        messaging.review_break_glass,
        "review_break_glass",
        "Mark a break-glass access reviewed (compliance)",
        "audit",
        gate=policy.can_review_break_glass,
        status=204,
        errors=(404,),
    ),
    Route(
        "POST",
        "/v1/admin/care-teams",
        messaging.create_care_team,
        "create_care_team",
        "Create a care team with its members (admin)",
        "administration",
        gate=policy.can_manage_care_teams,
        body=CareTeamBody,
        response=CareTeamOut,
        status=201,
        errors=(404, 409),
    ),
    Route(
        "PUT",
        "/v1/admin/care-teams/{team_id}/members",
        messaging.set_care_team_members,
        "set_care_team_members",
        "Set a care team's current members; joins and leaves are kept as history (admin)",
        "administration",
        gate=policy.can_manage_care_teams,
        body=CareTeamMembersBody,
        response=CareTeamOut,
        errors=(404,),
    ),
    Route(
        "GET",
        "/v1/admin/care-teams/{team_id}",
        messaging.get_care_team,
        "get_care_team",
        "A care team's members and membership history (admin)",
        "administration",
        gate=policy.can_manage_care_teams,
        response=CareTeamOut,
        errors=(404,),
    ),
    Route(
        "POST",
        "/v1/admin/webhook-endpoints",
        webhooks.register_endpoint,
        "register_webhook_endpoint",
        "Register a webhook endpoint for a practitioner or care team; its secrets are in this answer only (admin)",
        "webhooks",
        gate=policy.can_manage_webhooks,
        body=EndpointBody,
        response=EndpointCreatedOut,
        response_headers=NOT_CACHED,
        status=201,
        errors=(404, 422),
    ),
    Route(
        "GET",
        "/v1/admin/webhook-endpoints",
        webhooks.list_endpoints,
        "list_webhook_endpoints",
        "The tenant's webhook endpoints, newest first (admin)",
        "webhooks",
        gate=policy.can_manage_webhooks,
        response=EndpointListOut,
        response_headers=NOT_CACHED,
        errors=(404, 422),
        query=EndpointQuery,
    ),
    Route(
        "GET",
        "/v1/admin/webhook-endpoints/{id}",
        webhooks.get_endpoint,
        "get_webhook_endpoint",
        "A webhook endpoint (admin)",
        "webhooks",
        gate=policy.can_manage_webhooks,
        response=EndpointOut,
        response_headers=NOT_CACHED,
        errors=(404,),
    ),
    Route(
        "PATCH",
        "/v1/admin/webhook-endpoints/{id}",
        webhooks.update_endpoint,
        "update_webhook_endpoint",
        "Change an endpoint's URL (checked again) or event types (admin)",
        "webhooks",
        gate=policy.can_manage_webhooks,
        body=EndpointPatchBody,
        response=EndpointOut,
        response_headers=NOT_CACHED,
        errors=(404, 422),
    ),
    Route(
        "DELETE",
        "/v1/admin/webhook-endpoints/{id}",
        webhooks.delete_endpoint,
        "delete_webhook_endpoint",
        "Remove an endpoint: no new deliveries or replies; its deliveries are kept, held (admin)",
        "webhooks",
        gate=policy.can_manage_webhooks,
        status=204,
        errors=(404,),
    ),
    Route(
        "POST",
        "/v1/admin/webhook-endpoints/{id}/rotate",
        webhooks.rotate_secret,
        "rotate_webhook_secret",
        "A new secret (shown once); the current one stays valid for 24 hours, and deliveries carry both "
        "signatures meanwhile (admin)",
        "webhooks",
        gate=policy.can_manage_webhooks,
        body=RotateBody,
        response=SecretsOut,
        response_headers=NOT_CACHED,
        status=201,
        errors=(404, 422),
    ),
    Route(
        "POST",
        "/v1/admin/webhook-endpoints/{id}/enable",
        webhooks.enable_endpoint,
        "enable_webhook_endpoint",
        "Enable a disabled endpoint; the deliveries held meanwhile go at once (admin)",
        "webhooks",
        gate=policy.can_manage_webhooks,
        response=EndpointEnabledOut,
        response_headers=NOT_CACHED,
        errors=(404,),
    ),
    Route(
        "POST",
        "/v1/admin/webhook-endpoints/{id}/disable",
        webhooks.disable_endpoint,
        "disable_webhook_endpoint",
        "Disable an endpoint; its deliveries are held, not dropped, until it is enabled (admin)",
        "webhooks",
        gate=policy.can_manage_webhooks,
        response=EndpointOut,
        response_headers=NOT_CACHED,
        errors=(404,),
    ),
    Route(
        "GET",
        "/v1/admin/webhook-endpoints/{id}/deliveries",
        webhooks.list_deliveries,
        "list_webhook_deliveries",
        "An endpoint's deliveries, newest first (admin)",
        "webhooks",
        gate=policy.can_manage_webhooks,
        response=DeliveryListOut,
        response_headers=NOT_CACHED,
        errors=(404, 422),
        query=DeliveryQuery,
    ),
    Route(
        "GET",
        "/v1/admin/webhook-endpoints/{id}/deliveries/{delivery_id}",
        webhooks.get_delivery,
        "get_webhook_delivery",
        "One delivery with every attempt: time, duration, status code or error class, never a response body (admin)",
        "webhooks",
        gate=policy.can_manage_webhooks,
        response=DeliveryOut,
        response_headers=NOT_CACHED,
        errors=(404,),
    ),
    Route(
        "POST",
        "/v1/admin/webhook-endpoints/{id}/deliveries/{delivery_id}/resend",
        webhooks.resend_delivery,
        "resend_webhook_delivery",
        "Send a delivery again now: the same webhook-id, a new timestamp and signature (admin)",
        "webhooks",
        gate=policy.can_manage_webhooks,
        response=DeliveryOut,
        response_headers=NOT_CACHED,
        status=202,
        errors=(404, 409),
    ),
    Route(
        "POST",
        "/v1/admin/webhook-endpoints/{id}/recover",
        webhooks.recover_deliveries,
        "recover_webhook_deliveries",
        "Send again every dead-lettered (or consent-held) delivery created in [since, until); consent is "
        "checked again for each (admin)",
        "webhooks",
        gate=policy.can_manage_webhooks,
        body=RecoverBody,
        response=RecoveredOut,
        response_headers=NOT_CACHED,
        status=202,
        errors=(404, 422),
    ),
    Route(
        "POST",
        "/v1/inbound/{endpoint_id}/replies",
        webhooks.receive_reply,
        "receive_webhook_reply",
        "A physician's reply from their own system, signed per Standard Webhooks with the endpoint's inbound "
        "secret (no bearer token). 201 with the new message; 200 with the first one when the same "
        "webhook-id and body come again; 409 for the same webhook-id with another body",
        "webhooks",
        public=True,
        signed=True,
        headers=WEBHOOK_HEADERS,
        body=InboundReplyBody,
        max_body_bytes=webhooks.max_reply_bytes,
        response=InboundReplyOut,
        status=201,
        other_responses=((200, InboundReplyOut),),
        errors=(400, 401, 403, 404, 409, 413, 415, 422, 503),
    ),
)


def add_routes(app: web.Application, routes: tuple[Route, ...] = ROUTES) -> frozenset[str]:
    """Register `routes`; return the names of the public ones (no token needed)."""
    for route in routes:
        app.router.add_route(route.method, route.path, route.handler, name=route.name)
    return frozenset(route.name for route in routes if route.public)


def route_gates(routes: tuple[Route, ...] = ROUTES) -> dict[str, Callable[[Principal], bool]]:
    """Route name -> the gate its caller must pass."""
    return {route.name: route.gate for route in routes if route.gate is not None}
