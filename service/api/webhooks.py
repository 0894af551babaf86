"""`/v1/admin/webhook-endpoints` (admin) and `/v1/inbound/{endpoint_id}/replies` (signed by the endpoint)."""

from __future__ import annotations

from collections.abc import Sequence

from aiohttp import web

from schemas.webhooks import (
    AttemptOut,
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
from service.api.bodies import parse_model, parse_query, read_json
from service.api.headers import NO_STORE, WEBHOOK_HEADERS, only
from service.api.messaging import decode_cursor, encode_cursor
from service.api.paths import DELIVERY_ID, ENDPOINT_ID, path_uuid
from service.domain.webhooks import DeliveryView, EndpointView, NewSecrets
from service.errors import PayloadTooLargeError, UnsupportedMediaTypeError
from service.keys import INBOUND, PRINCIPAL, SETTINGS, WEBHOOKS
from service.settings import Settings
from service.store.webhooks import DeliveryRecord, EndpointRecord

# Never cached: secrets are shown once, and the rest is an admin's current view.
_NO_STORE = NO_STORE.fixed()


def endpoint_out(view: EndpointView) -> EndpointOut:
    record = view.record
    return EndpointOut(
        id=str(record.id),
        subscriber=record.subscriber,
        url=view.url,
        event_types=list(record.event_types),
        status="disabled" if record.disabled_at is not None else "enabled",
        disabled_at=record.disabled_at,
        disabled_reason=record.disabled_reason,  # type: ignore[arg-type]
        failing_since=record.failing_since,
        signing_public_keys=list(record.signing_public_keys),
        created_by=record.created_by,
        created_at=record.created_at,
        updated_at=record.updated_at,
    )


def delivery_out(view: DeliveryView) -> DeliveryOut:
    record = view.record
    return DeliveryOut(
        id=str(record.id),
        webhook_id=view.webhook_id,
        endpoint_id=str(record.endpoint_id),
        event_type=record.event_type,
        data=record.payload,
        created_at=record.created_at,
        status=record.status,  # type: ignore[arg-type]
        held_reason=record.held_reason,
        in_flight=record.leased,
        attempts=record.attempts,
        next_attempt_at=record.next_attempt_at if record.status == "pending" else None,
        last_attempt_at=record.last_attempt_at,
        last_status_code=record.last_status_code,
        delivered_at=record.delivered_at,
        attempt_log=[
            AttemptOut(
                attempt=a.attempt,
                attempted_at=a.attempted_at,
                duration_ms=a.duration_ms,
                status_code=a.status_code,
                error_class=a.error_class,
            )
            for a in view.attempts
        ]
        if view.attempts
        else None,
    )


def _secrets_out(secrets: NewSecrets) -> SecretsOut:
    return SecretsOut(
        outbound_secret=secrets.outbound_secret,
        inbound_secret=secrets.inbound_secret,
        signing_public_key=secrets.signing_public_key,
    )


def _next_cursor(records: Sequence[EndpointRecord | DeliveryRecord], limit: int) -> str | None:
    """A full page may have a next one: it starts after the last item (newest first, by creation)."""
    if len(records) < limit:
        return None
    return encode_cursor((records[-1].created_at, records[-1].id))


def _json(model: object, status: int = 200) -> web.Response:
    assert hasattr(model, "model_dump")
    return web.json_response(model.model_dump(mode="json"), status=status, headers=_NO_STORE)


async def register_endpoint(request: web.Request) -> web.Response:
    body = await read_json(request, EndpointBody)
    view, secrets = await request.app[WEBHOOKS].register(
        request[PRINCIPAL], body.subscriber, body.url, list(body.event_types), ed25519=body.ed25519
    )
    return _json(EndpointCreatedOut(endpoint=endpoint_out(view), secrets=_secrets_out(secrets)), 201)


async def list_endpoints(request: web.Request) -> web.Response:
    query = parse_query(request, EndpointQuery)
    views = await request.app[WEBHOOKS].list_endpoints(
        request[PRINCIPAL], query.subscriber, decode_cursor(query.cursor), query.limit
    )
    return _json(
        EndpointListOut(
            items=[endpoint_out(v) for v in views],
            next_cursor=_next_cursor([v.record for v in views], query.limit),
        )
    )


async def get_endpoint(request: web.Request) -> web.Response:
    return _json(
        endpoint_out(await request.app[WEBHOOKS].get(request[PRINCIPAL], path_uuid(request, "WebhookEndpoint")))
    )


async def update_endpoint(request: web.Request) -> web.Response:
    endpoint_id = path_uuid(request, "WebhookEndpoint")
    body = await read_json(request, EndpointPatchBody)
    view = await request.app[WEBHOOKS].update(
        request[PRINCIPAL], endpoint_id, body.url, None if body.event_types is None else list(body.event_types)
    )
    return _json(endpoint_out(view))


async def delete_endpoint(request: web.Request) -> web.Response:
    await request.app[WEBHOOKS].delete(request[PRINCIPAL], path_uuid(request, "WebhookEndpoint"))
    return web.Response(status=204)


async def rotate_secret(request: web.Request) -> web.Response:
    endpoint_id = path_uuid(request, "WebhookEndpoint")
    body = await read_json(request, RotateBody)
    secrets = await request.app[WEBHOOKS].rotate(request[PRINCIPAL], endpoint_id, body.purpose)
    return _json(_secrets_out(secrets), 201)


async def enable_endpoint(request: web.Request) -> web.Response:
    view, released = await request.app[WEBHOOKS].enable(request[PRINCIPAL], path_uuid(request, "WebhookEndpoint"))
    return _json(EndpointEnabledOut(endpoint=endpoint_out(view), released=released))


async def disable_endpoint(request: web.Request) -> web.Response:
    return _json(
        endpoint_out(await request.app[WEBHOOKS].disable(request[PRINCIPAL], path_uuid(request, "WebhookEndpoint")))
    )


async def list_deliveries(request: web.Request) -> web.Response:
    endpoint_id = path_uuid(request, "WebhookEndpoint")
    query = parse_query(request, DeliveryQuery)
    views = await request.app[WEBHOOKS].deliveries(
        request[PRINCIPAL], endpoint_id, query.status, decode_cursor(query.cursor), query.limit
    )
    return _json(
        DeliveryListOut(
            items=[delivery_out(v) for v in views],
            next_cursor=_next_cursor([v.record for v in views], query.limit),
        )
    )


async def get_delivery(request: web.Request) -> web.Response:
    view = await request.app[WEBHOOKS].delivery(
        request[PRINCIPAL], path_uuid(request, "WebhookEndpoint"), path_uuid(request, "WebhookDelivery", DELIVERY_ID)
    )
    return _json(delivery_out(view))


async def resend_delivery(request: web.Request) -> web.Response:
    view = await request.app[WEBHOOKS].resend(
        request[PRINCIPAL], path_uuid(request, "WebhookEndpoint"), path_uuid(request, "WebhookDelivery", DELIVERY_ID)
    )
    return _json(delivery_out(view), 202)


async def recover_deliveries(request: web.Request) -> web.Response:
    endpoint_id = path_uuid(request, "WebhookEndpoint")
    body = await read_json(request, RecoverBody)
    count = await request.app[WEBHOOKS].recover(request[PRINCIPAL], endpoint_id, body.since, body.until)
    return _json(RecoveredOut(recovered=count), 202)


def max_reply_bytes(settings: Settings) -> int:
    """The largest reply `receive_reply` takes (more is a 413): it reads its body itself, to verify the
    signature on the raw bytes, so `read_json`'s limit is not this one. The route table documents it from here."""
    return settings.inbound_max_body_bytes


async def receive_reply(request: web.Request) -> web.Response:
    """A physician's reply from their own system. The signature is verified on the raw bytes first;
    only then is the body parsed."""
    endpoint_id = path_uuid(request, "WebhookEndpoint", ENDPOINT_ID)
    limit = max_reply_bytes(request.app[SETTINGS])
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLargeError(f"The limit for a reply is {limit} bytes")
    raw = await _read_capped(request, limit)
    # Only the signature's headers, each as often as it was sent (a repeated one is refused).
    reply = await request.app[INBOUND].verify(endpoint_id, only(request, WEBHOOK_HEADERS), raw)
    if request.content_type != "application/json":
        raise UnsupportedMediaTypeError("Send the body as application/json")
    body = parse_model(raw, InboundReplyBody)
    accepted = await request.app[INBOUND].accept(reply, body.thread_id, body.in_reply_to, body.body, body.sender)
    out = InboundReplyOut(
        thread_id=str(accepted.thread_id),
        message_id=str(accepted.message_id),
        seq=accepted.seq,
        replayed=accepted.replayed,
    )
    return web.json_response(out.model_dump(mode="json"), status=200 if accepted.replayed else 201)


async def _read_capped(request: web.Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"The limit for a reply is {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
