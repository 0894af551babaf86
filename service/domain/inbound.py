"""Physicians' replies through signed inbound webhooks.

`POST /v1/inbound/{endpoint_id}/replies` carries no bearer token: the Standard Webhooks signature under
the endpoint's inbound secret is the credential. In order:

1. `verify`: find the endpoint's tenant, open its inbound secrets (two during a rotation) and verify
   the signature on the raw bytes, before anything parses them; the timestamp must be within the
   tolerance (five minutes) either way. A failure is audited and answers 401 (400 for headers that are
   malformed rather than wrong), and says nothing about whether the endpoint exists. A disabled
   endpoint refuses even a reply its secret signed, with the answer an unknown endpoint gives.
2. `accept`: the sender must be the endpoint's practitioner, or a current member of its care team; then
   the reply is a message like any other (`MessagingService.send_within`: policy, consent, sealing, the
   outbox rows that notify the other side, the audit event, which names the endpoint, the secret that
   verified and the `webhook-id`). The receipt (endpoint, webhook-id, the body's keyed fingerprint) is
   written in the same transaction: the same delivery again answers with the first message, the same id
   with another body is a conflict.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from uuid import UUID

from crypto.webhooks import Reason, WebhookVerificationError, generate_secret, verify
from service.domain.audit import AuditAction, AuditEvent
from service.domain.idempotency import RequestFingerprints, same_request
from service.domain.keyring import PatientKeyring
from service.domain.messaging import MessagingService
from service.domain.principal import Principal, Role, is_reference
from service.domain.webhooks import open_secrets
from service.errors import (
    ConflictError,
    DomainError,
    FieldProblem,
    ForbiddenError,
    InvalidRequestError,
    MalformedRequestError,
    WebhookSignatureError,
)
from service.store.db import Database
from service.store.messaging import MessagingStore
from service.store.tenants import TenantStore
from service.store.webhooks import WebhookStore

# Header problems that are malformed requests (400) rather than failed authentication (401).
_MALFORMED = frozenset({Reason.MISSING_HEADER, Reason.BAD_ID, Reason.BAD_TIMESTAMP})
# The one detail of every 401 here: it never says whether the endpoint exists, or is disabled.
_SIGNATURE_REFUSED = "The webhook signature is missing, wrong or stale"


@dataclass(frozen=True, slots=True)
class VerifiedReply:
    """A request whose signature verified: whose endpoint, which secret, which delivery."""

    tenant_id: UUID
    endpoint_id: UUID
    subscriber: str
    key_id: UUID
    webhook_id: str
    body_hash: bytes


@dataclass(frozen=True, slots=True)
class AcceptedReply:
    thread_id: UUID
    message_id: UUID
    seq: int | None  # None for a replay (the first answer had it)
    replayed: bool


class InboundReplies:
    def __init__(
        self,
        db: Database,
        store: WebhookStore,
        tenants: TenantStore,
        teams: MessagingStore,
        keyring: PatientKeyring,
        messaging: MessagingService,
        fingerprints: RequestFingerprints,
        *,
        tolerance_seconds: int = 300,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._db = db
        self._store = store
        self._tenants = tenants
        self._teams = teams
        self._keyring = keyring
        self._messaging = messaging
        self._fingerprints = fingerprints
        self._tolerance = tolerance_seconds
        # What an unknown endpoint's requests are checked against, so that they meet the same checks (and
        # answers) as a known endpoint's. Random, never stored or shown: nothing can be signed with it.
        self._decoy = generate_secret()
        self._clock = clock

    async def verify(self, endpoint_id: UUID, headers: Mapping[str, str], body: bytes) -> VerifiedReply:
        now = int(self._clock().timestamp())
        async with self._db.transaction() as tx:
            tenant_id = await self._store.endpoint_tenant(tx, endpoint_id)
        if tenant_id is None:
            raise self._unknown(None, endpoint_id, headers, body, now)
        async with self._db.transaction(tenant_id) as tx:
            endpoint = await self._store.endpoint(tx, tenant_id, endpoint_id)
            keys = await self._store.keys(tx, tenant_id, endpoint_id, ["inbound"])
            secrets = await open_secrets(self._keyring, tx, keys)
            # Kept with the receipt, for ever: keyed, so it confirms no guess of the reply to a database holder.
            body_fingerprint = await self._fingerprints.of_bytes(tx, body)
        if endpoint is None or not keys:
            raise self._unknown(tenant_id, endpoint_id, headers, body, now)
        try:
            index = verify(headers, body, secrets, now=now, tolerance=self._tolerance)
        except WebhookVerificationError as exc:
            raise _refused(exc.reason, tenant_id, endpoint_id, f"webhook-{exc.reason.value}") from None
        if endpoint.disabled_at is not None:
            # A disabled endpoint (by an admin, or for 410 Gone or failing) takes no replies either. The caller
            # hears what an unknown endpoint answers; the audit says why, and which secret signed the reply.
            raise _disabled(tenant_id, endpoint_id, keys[index].id)
        msg_id = next(v for k, v in headers.items() if k.lower() == "webhook-id")
        return VerifiedReply(tenant_id, endpoint_id, endpoint.subscriber, keys[index].id, msg_id, body_fingerprint)

    def _unknown(
        self, tenant_id: UUID | None, endpoint_id: UUID, headers: Mapping[str, str], body: bytes, now: int
    ) -> DomainError:
        """The refusal for an endpoint that does not exist (or has no inbound secret): the same answer a
        known endpoint gives a request not signed with its secret. The headers' form is checked as for
        any endpoint (400 when malformed), and the rest is 401, so no answer tells whether it exists."""
        try:
            verify(headers, body, [self._decoy], now=now, tolerance=self._tolerance)
        except WebhookVerificationError as exc:
            if exc.reason in _MALFORMED:
                return _refused(exc.reason, tenant_id, endpoint_id, f"webhook-{exc.reason.value}")
        return _refused(Reason.BAD_SIGNATURE, tenant_id, endpoint_id, "unknown-endpoint")

    async def accept(
        self, reply: VerifiedReply, thread_id: UUID, in_reply_to: UUID | None, body: str, sender: str
    ) -> AcceptedReply:
        if not is_reference(sender, "Practitioner"):
            raise InvalidRequestError([FieldProblem(("sender",), "reference", "a Practitioner/.. reference")])
        async with self._db.transaction(reply.tenant_id) as tx:
            tenant = await self._tenants.by_id(tx, reply.tenant_id)
            assert tenant is not None
            principal = Principal(
                tenant_id=reply.tenant_id,
                tenant=tenant.slug,
                subject=sender,
                role=Role.PHYSICIAN,
                issuer=endpoint_issuer(reply.endpoint_id),
                key_id=str(reply.key_id),  # the endpoint secret that verified the signature
            )
            # Checked again where the reply is written, and held: a disable that committed after `verify`
            # refuses the reply, and one still running waits for it.
            if not await self._store.accepting(tx, reply.tenant_id, reply.endpoint_id, reply.key_id):
                raise _disabled(reply.tenant_id, reply.endpoint_id, reply.key_id)
            message_id = uuid.uuid4()
            earlier = await self._store.claim_receipt(
                tx,
                reply.tenant_id,
                reply.endpoint_id,
                reply.webhook_id,
                reply.body_hash,
                reply.key_id,
                thread_id,
                message_id,
            )
            if earlier is not None:
                if not same_request(earlier.body_hash, reply.body_hash):
                    raise ConflictError("This webhook-id was already used for a different reply")
                return AcceptedReply(earlier.thread_id, earlier.message_id, None, replayed=True)
            if sender != reply.subscriber and reply.subscriber not in await self._teams.teams_of(
                tx, reply.tenant_id, sender
            ):
                raise ForbiddenError("The sender may not reply through this endpoint").recording(
                    AuditEvent.by(
                        principal,
                        AuditAction.ACCESS_DENIED,
                        resource_type="Thread",
                        resource_id=str(thread_id),
                        details={"attempt": "inbound-reply", "endpoint_id": str(reply.endpoint_id)},
                    ).denied("sender-not-subscriber")
                )
            view = await self._messaging.send_within(
                tx,
                principal,
                thread_id,
                body,
                in_reply_to=in_reply_to,
                message_id=message_id,
                evidence={
                    "via": "webhook",
                    "endpoint_id": str(reply.endpoint_id),
                    "key_id": str(reply.key_id),
                    "webhook_id": reply.webhook_id,
                },
                through=reply.subscriber,
            )
        return AcceptedReply(thread_id, view.record.id, view.record.seq, replayed=False)


def endpoint_issuer(endpoint_id: UUID) -> str:
    """The `issuer` of an inbound reply's audit events: the endpoint whose secret is its credential."""
    return f"urn:bedside:webhook:{endpoint_id}"


def _disabled(tenant_id: UUID, endpoint_id: UUID, key_id: UUID) -> WebhookSignatureError:
    """The refusal of a reply to an endpoint that is disabled (or, by the time the reply is written,
    deleted, or the secret that signed it expired): answered as an unknown endpoint is."""
    return WebhookSignatureError(
        "endpoint-disabled",
        _SIGNATURE_REFUSED,
        tenant_id=tenant_id,
        issuer=endpoint_issuer(endpoint_id),
        key_id=str(key_id),
    )


def _refused(reason: Reason, tenant_id: UUID | None, endpoint_id: UUID, code: str) -> DomainError:
    """The error for a request that did not verify. Both kinds are audited as `auth:denied`: a 401 by
    the middleware (as every failed authentication), a malformed request through the event it carries."""
    issuer = endpoint_issuer(endpoint_id)
    if reason in _MALFORMED:
        event = AuditEvent(
            action=AuditAction.AUTH_DENIED,
            tenant_id=tenant_id,
            issuer=issuer,
            resource_type="WebhookEndpoint",
            resource_id=str(endpoint_id),
        ).denied(code)
        return MalformedRequestError(f"The webhook headers are malformed ({reason.value})").recording(event)
    return WebhookSignatureError(code, _SIGNATURE_REFUSED, tenant_id=tenant_id, issuer=issuer)
