"""Physician webhooks: endpoints (admin), and the delivery of thin, signed notifications.

An endpoint belongs to a practitioner or a care team. Its URL and secrets are sealed under the tenant's
own data key (`Tenant/secrets`). Deliveries are the outbox rows a send writes in its transaction; a
worker leases them (`FOR UPDATE SKIP LOCKED`, any number of replicas), and for each one, with no
transaction open during the HTTP call:

1. reads the delivery, its endpoint and its patient, and asks the consent ledger again: a delivery for a
   pair whose messaging consent is no longer in force is held (and audited), never sent;
2. checks the URL again (SSRF guard: resolve, refuse any address that is not globally routable) and
   connects only to the address it checked;
3. posts the thin payload (`{"type", "timestamp", "data": {ids}}`) with the Standard Webhooks headers,
   signed with every valid secret (both during a rotation), `webhook-id` stable across retries;
4. records the attempt (time, duration, status code or a fixed error class; never the response body),
   then: 2xx succeeded (audited); 410 disables the endpoint; anything else is retried on the schedule,
   with jitter, honouring `Retry-After` within bounds, and dead-lettered after the last attempt; an
   endpoint failing continuously for too long is disabled, and its deliveries held until re-enabled.

A delivery that fails on our side before the call (a sealed URL or secret that does not open, a payload
that does not serialize) is a failed attempt too, of error class `internal-error`, on the same schedule to
the same dead letter, or held if its endpoint is disabled; it does not count against the endpoint. Two
failures are not attempts: a database that cannot be reached (nothing was sent, so no attempt is used up)
and any failure once the request is on its way (the receiver may have it: settling it again is not ours to
guess). Both propagate; the lease expires and the reaper returns the delivery, which goes again with the
same `webhook-id` (at least once).
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Protocol
from uuid import UUID

import structlog

from crypto.webhooks import generate_secret, generate_signing_key, public_key_for, signed_headers
from service.domain.audit import AuditAction, AuditEvent, AuditRecorder
from service.domain.consents import ConsentLedger, Scope
from service.domain.keyring import TENANT_KEY_OWNER, PatientKeyring
from service.domain.policy import can_manage_webhooks
from service.domain.principal import Principal, is_reference
from service.domain.ssrf import (
    IPAddress,
    IPNetwork,
    ResolvedTarget,
    UnsafeUrlError,
    UrlReason,
    check_addresses,
    parse_url,
)
from service.errors import ConflictError, FieldProblem, InvalidRequestError, NotFoundError, UnavailableError
from service.store.db import Database, Tx
from service.store.webhooks import (
    AttemptRecord,
    DeliveryRecord,
    DeliveryWork,
    EndpointKeyRecord,
    EndpointRecord,
    WebhookStore,
)

log = structlog.get_logger("bedside.webhooks")

EVENT_TYPES = ("message.created", "message.recalled", "thread.created", "consent.revoked")
# Events about a patient's thread are deliveries between the patient and the subscriber: consent gates
# them. `consent.revoked` tells the grantee that a consent it held ended, and carries only its id.
CONSENT_GATED = frozenset({"message.created", "message.recalled", "thread.created"})
SECRET_PURPOSES = ("outbound", "inbound", "ed25519")
USER_AGENT = "Bedside-Webhooks/1"
# The error class of an attempt that failed on our side before anything was sent (a sealed URL or secret
# that does not open, a payload that does not serialize), not the receiver's.
INTERNAL_ERROR = "internal-error"

Resolver = Callable[[str, int], Awaitable[Sequence[IPAddress]]]


# -- pure parts -------------------------------------------------------------------------------------


def webhook_id(delivery_id: UUID) -> str:
    """The `webhook-id` of a delivery: the same on every attempt, so receivers can de-duplicate."""
    return f"msg_{delivery_id.hex}"


def payload_bytes(event_type: str, occurred_at: datetime, data: Mapping[str, object]) -> bytes:
    """The body sent: the same bytes on every attempt (the event's own time, not the attempt's)."""
    document = {
        "type": event_type,
        "timestamp": occurred_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "data": dict(data),
    }
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


def next_delay(
    tries: int,
    schedule: Sequence[float],
    *,
    retry_after: float | None,
    jitter: float,
    retry_after_max: float,
    rand: Callable[[], float],
) -> float | None:
    """Seconds until the next attempt after `tries` failed attempts in this pass; None when the schedule
    is spent (dead-letter). The schedule's delay is stretched by up to `jitter` (a fraction) so retries
    of many deliveries spread out; a `Retry-After` longer than that is honoured up to `retry_after_max`."""
    if tries < 1 or tries > len(schedule):
        return None
    delay = schedule[tries - 1] * (1.0 + jitter * rand())
    if retry_after is not None and retry_after > delay:
        delay = min(retry_after, max(retry_after_max, delay))
    return delay


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """`Retry-After` as seconds from `now`: delta-seconds or an HTTP date; None if absent or malformed."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit() and text.isascii():
        digits = text.lstrip("0") or "0"  # int() refuses more than 4,300 digits: cap before converting
        return float(min(int(digits), 10**9)) if len(digits) <= 10 else float(10**9)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


# -- the outside world, injected ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TransportResult:
    """What one HTTP attempt came to: a status code, or a fixed error class (never a body)."""

    status_code: int | None
    error_class: str | None
    retry_after: str | None
    duration_ms: int


class Transport(Protocol):
    async def post(self, target: ResolvedTarget, headers: Mapping[str, str], body: bytes) -> TransportResult: ...


@dataclass(frozen=True, slots=True)
class UrlGuard:
    """Where webhooks may go: https to globally routable addresses (plus the allow-listed networks, and
    http to loopback when development allows it). Resolves with the injected resolver."""

    resolve: Resolver
    allow_http_loopback: bool = False
    allow_networks: tuple[IPNetwork, ...] = ()

    async def check(self, url: str) -> ResolvedTarget:
        parsed = parse_url(url)
        if parsed.literal is not None:
            addresses: Sequence[IPAddress] = (parsed.literal,)
        else:
            try:
                addresses = await self.resolve(parsed.host, parsed.port)
            except OSError:
                raise UnsafeUrlError(UrlReason.UNRESOLVABLE) from None
        return check_addresses(
            parsed, addresses, allow_http_loopback=self.allow_http_loopback, allow_networks=self.allow_networks
        )


@dataclass(frozen=True, slots=True)
class DeliveryPolicy:
    schedule: tuple[float, ...] = (5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400)
    jitter: float = 0.2
    retry_after_max: float = 86400
    disable_after: timedelta = timedelta(days=5)
    secret_overlap: timedelta = timedelta(hours=24)


# -- views --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EndpointView:
    record: EndpointRecord  # its signing_public_keys are the v1a keys in use, public
    url: str


@dataclass(frozen=True, slots=True)
class NewSecrets:
    """Shown once, when made: never stored in the clear, never shown again."""

    outbound_secret: str | None = None
    inbound_secret: str | None = None
    signing_public_key: str | None = None


@dataclass(frozen=True, slots=True)
class DeliveryView:
    record: DeliveryRecord
    webhook_id: str
    attempts: tuple[AttemptRecord, ...] = ()


def _url_context(endpoint_id: UUID) -> dict[str, str]:
    return {"column": "webhook_endpoints.url", "row": str(endpoint_id)}


def _secret_context(key_id: UUID, endpoint_id: UUID, purpose: str) -> dict[str, str]:
    return {
        "column": "webhook_endpoint_keys.secret",
        "row": str(key_id),
        "endpoint": str(endpoint_id),
        "purpose": purpose,
    }


async def open_secrets(keyring: PatientKeyring, tx: Tx, keys: Sequence[EndpointKeyRecord]) -> list[str]:
    """The secrets in the clear (one key lookup for all: they are sealed under the one tenant key)."""
    opened = await keyring.open_many(tx, [(k.secret, _secret_context(k.id, k.endpoint_id, k.purpose)) for k in keys])
    return [o.decode() for o in opened]


_SUBSCRIBER_PROBLEM = FieldProblem(("subscriber",), "reference", "a Practitioner/.. or CareTeam/.. reference")


def _is_subscriber(subscriber: str) -> bool:
    return is_reference(subscriber, "Practitioner") or is_reference(subscriber, "CareTeam")


def _check_event_types(event_types: Sequence[str]) -> list[FieldProblem]:
    if not event_types or len(event_types) > len(EVENT_TYPES) or len(set(event_types)) != len(event_types):
        return [FieldProblem(("event_types",), "count", "1 or more distinct event types")]
    return [
        FieldProblem(("event_types", i), "enum", f"one of {', '.join(EVENT_TYPES)}")
        for i, event_type in enumerate(event_types)
        if event_type not in EVENT_TYPES
    ]


# -- the admin's side ---------------------------------------------------------------------------------


class WebhookEndpoints:
    def __init__(
        self,
        db: Database,
        store: WebhookStore,
        keyring: PatientKeyring,
        audit: AuditRecorder,
        guard: UrlGuard,
        *,
        policy: DeliveryPolicy = DeliveryPolicy(),
    ) -> None:
        self._db = db
        self._store = store
        self._keyring = keyring
        self._audit = audit
        self._guard = guard
        self._policy = policy

    async def register(
        self, principal: Principal, subscriber: str, url: str, event_types: Sequence[str], *, ed25519: bool = False
    ) -> tuple[EndpointView, NewSecrets]:
        self._admin(principal, "webhook:register")
        problems = _check_event_types(event_types)
        if not _is_subscriber(subscriber):
            problems.append(_SUBSCRIBER_PROBLEM)
        if problems:
            raise InvalidRequestError(problems)
        await self._guard.check(url)
        endpoint_id = uuid.uuid4()
        outbound, inbound = generate_secret(), generate_secret()
        signing_key = generate_signing_key() if ed25519 else None
        async with self._db.transaction(principal.tenant_id) as tx:
            sealed_url = await self._keyring.seal_for(tx, TENANT_KEY_OWNER, url.encode(), _url_context(endpoint_id))
            await self._store.create_endpoint(
                tx, principal.tenant_id, endpoint_id, subscriber, sealed_url, event_types, principal.subject
            )
            await self._add_key(tx, principal, endpoint_id, "outbound", outbound)
            await self._add_key(tx, principal, endpoint_id, "inbound", inbound)
            if signing_key is not None:
                await self._add_key(tx, principal, endpoint_id, "ed25519", signing_key)
            await self._audit.record(
                tx,
                self._event(
                    principal,
                    AuditAction.WEBHOOK_REGISTER,
                    endpoint_id,
                    subscriber=subscriber,
                    event_types=list(event_types),
                    ed25519=ed25519,
                ),
            )
            view = await self._view(tx, principal, endpoint_id)
        public = public_key_for(signing_key) if signing_key is not None else None
        return view, NewSecrets(outbound, inbound, public)

    async def list_endpoints(
        self, principal: Principal, subscriber: str | None, cursor: tuple[datetime, UUID] | None, limit: int
    ) -> list[EndpointView]:
        self._admin(principal, "webhook:list")
        if subscriber is not None and not _is_subscriber(subscriber):
            # Checked before the query: a filter with a NUL in it is one PostgreSQL refuses outright.
            raise InvalidRequestError([_SUBSCRIBER_PROBLEM])
        async with self._db.transaction(principal.tenant_id) as tx:
            records = await self._store.endpoints(tx, principal.tenant_id, subscriber, cursor, limit)
            views = await self._views(tx, records)
            await self._audit.record(
                tx,
                AuditEvent.by(
                    principal,
                    AuditAction.WEBHOOK_READ,
                    resource_type="WebhookEndpoint",
                    details={"count": len(views)},
                ),
            )
        return views

    async def get(self, principal: Principal, endpoint_id: UUID) -> EndpointView:
        self._admin(principal, "webhook:read")
        async with self._db.transaction(principal.tenant_id) as tx:
            view = await self._view(tx, principal, endpoint_id)
            await self._audit.record(tx, self._event(principal, AuditAction.WEBHOOK_READ, endpoint_id))
        return view

    async def update(
        self, principal: Principal, endpoint_id: UUID, url: str | None, event_types: Sequence[str] | None
    ) -> EndpointView:
        self._admin(principal, "webhook:update")
        if event_types is not None and (problems := _check_event_types(event_types)):
            raise InvalidRequestError(problems)
        if url is not None:
            await self._guard.check(url)
        async with self._db.transaction(principal.tenant_id) as tx:
            await self._existing(tx, principal, endpoint_id, lock=True)
            sealed = (
                None
                if url is None
                else await self._keyring.seal_for(tx, TENANT_KEY_OWNER, url.encode(), _url_context(endpoint_id))
            )
            await self._store.update_endpoint(tx, principal.tenant_id, endpoint_id, sealed, event_types)
            await self._audit.record(
                tx,
                self._event(
                    principal,
                    AuditAction.WEBHOOK_UPDATE,
                    endpoint_id,
                    url_changed=url is not None,
                    event_types=None if event_types is None else list(event_types),
                ),
            )
            return await self._view(tx, principal, endpoint_id)

    async def delete(self, principal: Principal, endpoint_id: UUID) -> None:
        self._admin(principal, "webhook:delete")
        async with self._db.transaction(principal.tenant_id) as tx:
            await self._existing(tx, principal, endpoint_id, lock=True)
            await self._store.delete_endpoint(tx, principal.tenant_id, endpoint_id)
            await self._audit.record(tx, self._event(principal, AuditAction.WEBHOOK_DELETE, endpoint_id))

    async def rotate(self, principal: Principal, endpoint_id: UUID, purpose: str) -> NewSecrets:
        """A new secret of `purpose`; the ones in use stay valid for the overlap (24 hours by default), and
        outbound ones are all used to sign meanwhile."""
        self._admin(principal, "webhook:rotate")
        if purpose not in SECRET_PURPOSES:
            raise InvalidRequestError([FieldProblem(("purpose",), "enum", "outbound, inbound or ed25519")])
        secret = generate_signing_key() if purpose == "ed25519" else generate_secret()
        async with self._db.transaction(principal.tenant_id) as tx:
            await self._existing(tx, principal, endpoint_id, lock=True)
            await self._store.expire_keys(
                tx, principal.tenant_id, endpoint_id, purpose, self._policy.secret_overlap.total_seconds()
            )
            key_id = await self._add_key(tx, principal, endpoint_id, purpose, secret)
            await self._audit.record(
                tx, self._event(principal, AuditAction.WEBHOOK_ROTATE, endpoint_id, purpose=purpose, key_id=str(key_id))
            )
        if purpose == "ed25519":
            return NewSecrets(signing_public_key=public_key_for(secret))
        return NewSecrets(outbound_secret=secret) if purpose == "outbound" else NewSecrets(inbound_secret=secret)

    async def enable(self, principal: Principal, endpoint_id: UUID) -> tuple[EndpointView, int]:
        """Enable a disabled endpoint: the deliveries held meanwhile are due at once. (view, how many)."""
        self._admin(principal, "webhook:enable")
        async with self._db.transaction(principal.tenant_id) as tx:
            await self._existing(tx, principal, endpoint_id, lock=True)
            released = await self._store.enable(tx, principal.tenant_id, endpoint_id)
            await self._audit.record(
                tx, self._event(principal, AuditAction.WEBHOOK_ENABLE, endpoint_id, released=released)
            )
            return await self._view(tx, principal, endpoint_id), released

    async def disable(self, principal: Principal, endpoint_id: UUID) -> EndpointView:
        self._admin(principal, "webhook:disable")
        async with self._db.transaction(principal.tenant_id) as tx:
            await self._existing(tx, principal, endpoint_id, lock=True)
            await self._store.disable(tx, principal.tenant_id, endpoint_id, "admin")
            await self._audit.record(
                tx, self._event(principal, AuditAction.WEBHOOK_DISABLE, endpoint_id, reason="admin")
            )
            return await self._view(tx, principal, endpoint_id)

    async def deliveries(
        self,
        principal: Principal,
        endpoint_id: UUID,
        status: str | None,
        cursor: tuple[datetime, UUID] | None,
        limit: int,
    ) -> list[DeliveryView]:
        self._admin(principal, "webhook:deliveries")
        async with self._db.transaction(principal.tenant_id) as tx:
            await self._existing(tx, principal, endpoint_id)
            records = await self._store.deliveries(tx, principal.tenant_id, endpoint_id, status, cursor, limit)
            await self._audit.record(
                tx, self._event(principal, AuditAction.WEBHOOK_READ, endpoint_id, deliveries=len(records))
            )
        return [DeliveryView(r, webhook_id(r.id)) for r in records]

    async def delivery(self, principal: Principal, endpoint_id: UUID, delivery_id: UUID) -> DeliveryView:
        self._admin(principal, "webhook:delivery")
        async with self._db.transaction(principal.tenant_id) as tx:
            await self._existing(tx, principal, endpoint_id)
            record = await self._store.delivery(tx, principal.tenant_id, endpoint_id, delivery_id)
            if record is None:
                self._not_found(principal, "WebhookDelivery", delivery_id, "webhook:delivery")
            assert record is not None
            attempts = await self._store.attempts(tx, principal.tenant_id, delivery_id)
            await self._audit.record(
                tx,
                AuditEvent.by(
                    principal,
                    AuditAction.WEBHOOK_READ,
                    resource_type="WebhookDelivery",
                    resource_id=str(delivery_id),
                    details={"endpoint_id": str(endpoint_id)},
                ),
            )
        return DeliveryView(record, webhook_id(record.id), tuple(attempts))

    async def resend(self, principal: Principal, endpoint_id: UUID, delivery_id: UUID) -> DeliveryView:
        """Send one delivery again now: the same `webhook-id`, a new timestamp and signature."""
        self._admin(principal, "webhook:resend")
        async with self._db.transaction(principal.tenant_id) as tx:
            await self._existing(tx, principal, endpoint_id)
            if await self._store.delivery(tx, principal.tenant_id, endpoint_id, delivery_id) is None:
                self._not_found(principal, "WebhookDelivery", delivery_id, "webhook:resend")
            if not await self._store.resend(tx, principal.tenant_id, endpoint_id, delivery_id):
                raise ConflictError("an attempt of this delivery is in flight; try again when it ends")
            record = await self._store.delivery(tx, principal.tenant_id, endpoint_id, delivery_id)
            assert record is not None
            await self._audit.record(
                tx,
                AuditEvent.by(
                    principal,
                    AuditAction.WEBHOOK_RESEND,
                    resource_type="WebhookDelivery",
                    resource_id=str(delivery_id),
                    details={"endpoint_id": str(endpoint_id)},
                ),
            )
        return DeliveryView(record, webhook_id(record.id))

    async def recover(self, principal: Principal, endpoint_id: UUID, since: datetime, until: datetime) -> int:
        """Every dead-lettered (or consent-held) delivery of the endpoint created in [since, until) is due
        again, with a new pass through the schedule. How many."""
        self._admin(principal, "webhook:recover")
        if until <= since:
            raise InvalidRequestError([FieldProblem(("until",), "range", "after since")])
        async with self._db.transaction(principal.tenant_id) as tx:
            await self._existing(tx, principal, endpoint_id)
            count = await self._store.recover(tx, principal.tenant_id, endpoint_id, since, until)
            await self._audit.record(
                tx, self._event(principal, AuditAction.WEBHOOK_RECOVER, endpoint_id, recovered=count)
            )
        return count

    # -- helpers ---------------------------------------------------------------------------------

    async def _add_key(self, tx: Tx, principal: Principal, endpoint_id: UUID, purpose: str, secret: str) -> UUID:
        key_id = uuid.uuid4()
        sealed = await self._keyring.seal_for(
            tx, TENANT_KEY_OWNER, secret.encode(), _secret_context(key_id, endpoint_id, purpose)
        )
        public = public_key_for(secret) if purpose == "ed25519" else None
        await self._store.add_key(tx, principal.tenant_id, key_id, endpoint_id, purpose, sealed, public)
        return key_id

    async def _existing(self, tx: Tx, principal: Principal, endpoint_id: UUID, *, lock: bool = False) -> EndpointRecord:
        record = await self._store.endpoint(tx, principal.tenant_id, endpoint_id, lock=lock)
        if record is None:
            self._not_found(principal, "WebhookEndpoint", endpoint_id, "webhook")
        assert record is not None
        return record

    async def _view(self, tx: Tx, principal: Principal, endpoint_id: UUID) -> EndpointView:
        (view,) = await self._views(tx, [await self._existing(tx, principal, endpoint_id)])
        return view

    async def _views(self, tx: Tx, records: Sequence[EndpointRecord]) -> list[EndpointView]:
        """The endpoints with their URLs opened (one key lookup for the whole page)."""
        urls = await self._keyring.open_many(tx, [(r.url, _url_context(r.id)) for r in records])
        return [EndpointView(r, url.decode()) for r, url in zip(records, urls, strict=True)]

    def _admin(self, principal: Principal, attempt: str) -> None:
        if not can_manage_webhooks(principal):
            raise NotFoundError().recording(
                AuditEvent.by(
                    principal, AuditAction.ACCESS_DENIED, resource_type="WebhookEndpoint", details={"attempt": attempt}
                ).denied("policy")
            )

    @staticmethod
    def _not_found(principal: Principal, resource_type: str, resource_id: UUID, attempt: str) -> None:
        raise NotFoundError().recording(
            AuditEvent.by(
                principal,
                AuditAction.ACCESS_DENIED,
                resource_type=resource_type,
                resource_id=str(resource_id),
                details={"attempt": attempt},
            ).denied("not-found")
        )

    @staticmethod
    def _event(principal: Principal, action: AuditAction, endpoint_id: UUID, **details: object) -> AuditEvent:
        return AuditEvent.by(
            principal,
            action,
            resource_type="WebhookEndpoint",
            resource_id=str(endpoint_id),
            details={k: v for k, v in details.items() if v is not None},
        )


# -- the worker's side --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Request:
    """A delivery ready to go: the address its URL was checked at, the signed headers and the body."""

    work: DeliveryWork
    target: ResolvedTarget
    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class _Refused:
    """A delivery whose URL the guard refused at this attempt: nothing to send, a failed attempt to record."""

    work: DeliveryWork
    result: TransportResult


class WebhookDispatcher:
    """One delivery attempt at a time, from lease to settlement. The worker loop calls it concurrently."""

    def __init__(
        self,
        db: Database,
        store: WebhookStore,
        keyring: PatientKeyring,
        consents: ConsentLedger,
        audit: AuditRecorder,
        transport: Transport,
        guard: UrlGuard,
        *,
        policy: DeliveryPolicy = DeliveryPolicy(),
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._db = db
        self._store = store
        self._keyring = keyring
        self._consents = consents
        self._audit = audit
        self._transport = transport
        self._guard = guard
        self._policy = policy
        self._clock = clock
        self._rand = rand

    async def claim(self, owner: UUID, lease_seconds: float, limit: int) -> list[tuple[UUID, UUID]]:
        async with self._db.transaction() as tx:
            return await self._store.claim(tx, owner, lease_seconds, limit)

    async def reap(self) -> int:
        async with self._db.transaction() as tx:
            return await self._store.reap(tx)

    async def deliver(self, owner: UUID, tenant_id: UUID, delivery_id: UUID) -> str:
        """Attempt one leased delivery. Returns what became of it: succeeded, retry, dead, held, lost.

        A delivery our side fails to prepare (its sealed URL or secrets do not open, its payload does not
        serialize) is a failed attempt all the same: see `_fail`. Two failures propagate instead, and the
        lease then expires and the reaper returns the delivery to the queue: a database that cannot be
        reached (`UnavailableError`: nothing was sent, so no attempt is used up), and any failure after the
        request went out, in sending or in settling (the receiver may have accepted it: it goes again with
        the same `webhook-id`, at least once, and is never recorded as our failure or dead-lettered)."""
        started = self._clock()
        try:
            prepared = await self._prepare(owner, tenant_id, delivery_id)
        except UnavailableError:
            raise  # nothing was sent: leave the lease to expire rather than use up an attempt
        except Exception as error:
            return await self._fail(owner, tenant_id, delivery_id, started, error)
        if isinstance(prepared, str):
            return prepared
        if isinstance(prepared, _Request):
            result = await self._transport.post(prepared.target, prepared.headers, prepared.body)
        else:
            result = prepared.result
        return await self._settle(owner, tenant_id, prepared.work, result)

    async def _prepare(self, owner: UUID, tenant_id: UUID, delivery_id: UUID) -> str | _Request | _Refused:
        """Everything before the request is sent: the delivery read under its lease, consent asked again
        (or the delivery held), the URL and secrets opened, the URL checked, the body built and signed.
        Instead of a request: the outcome already settled (lost, held), or the URL the guard refused."""
        async with self._db.transaction(tenant_id) as tx:
            work = await self._store.work(tx, tenant_id, delivery_id, owner)
            if work is None:
                return "lost"  # the lease expired and another worker has it, or it was settled meanwhile
            if work.endpoint.disabled_at is not None or not work.endpoint.active:
                await self._hold(tx, tenant_id, work, owner, "endpoint-disabled", {})
                return "held"
            if work.delivery.event_type in CONSENT_GATED:
                if work.patient is None:
                    await self._hold(tx, tenant_id, work, owner, "consent", {"consent_reason": "no-thread"})
                    return "held"
                decision = await self._consents.decide(tx, work.patient, work.endpoint.subscriber, Scope.MESSAGING)
                if not decision.permit:
                    await self._hold(tx, tenant_id, work, owner, "consent", decision.audit_details())
                    return "held"
            opened = await self._keyring.open_many(
                tx,
                [(work.endpoint.url, _url_context(work.endpoint.id))]
                + [(k.secret, _secret_context(k.id, k.endpoint_id, k.purpose)) for k in work.keys],
            )
        url = opened[0].decode()
        secrets = [o.decode() for k, o in zip(work.keys, opened[1:], strict=True) if k.purpose == "outbound"]
        signing = [o.decode() for k, o in zip(work.keys, opened[1:], strict=True) if k.purpose == "ed25519"]
        checked = self._clock()
        try:
            target = await self._guard.check(url)
        except UnsafeUrlError:
            return _Refused(work, TransportResult(None, "unsafe-url", None, _ms_since(checked, self._clock())))
        body = payload_bytes(work.delivery.event_type, work.delivery.created_at, work.delivery.payload)
        headers = signed_headers(
            webhook_id(work.delivery.id), int(self._clock().timestamp()), body, secrets, ed25519_keys=signing
        )
        headers.update({"content-type": "application/json", "user-agent": USER_AGENT})
        return _Request(work, target, headers, body)

    async def _settle(self, owner: UUID, tenant_id: UUID, work: DeliveryWork, result: TransportResult) -> str:
        """Record the attempt and decide what follows, in one transaction (and, for the common outcomes,
        one statement besides the audit event)."""
        now = self._clock()
        delivery, endpoint = work.delivery, work.endpoint
        code = result.status_code
        succeeded = code is not None and 200 <= code < 300
        state, held_reason, disable, next_at = "succeeded", None, None, None
        if code == 410:
            state, held_reason, disable = "held", "endpoint-disabled", "gone"
        elif not succeeded:
            since = endpoint.failing_since or now
            delay = next_delay(
                delivery.tries + 1,
                self._policy.schedule,
                retry_after=parse_retry_after(result.retry_after, now),
                jitter=self._policy.jitter,
                retry_after_max=self._policy.retry_after_max,
                rand=self._rand,
            )
            if now - since >= self._policy.disable_after:
                state, held_reason, disable = "held", "endpoint-disabled", "failing"
            elif delay is None:
                state = "dead"
            else:
                state, next_at = "pending", now + timedelta(seconds=delay)
        async with self._db.transaction(tenant_id) as tx:
            attempt, ours = await self._store.finish(
                tx,
                tenant_id,
                delivery.id,
                endpoint.id,
                owner,
                attempted_at=now - timedelta(milliseconds=result.duration_ms),
                duration_ms=result.duration_ms,
                status_code=code,
                error_class=result.error_class,
                status=state,
                held_reason=held_reason,
                next_attempt_at=next_at,
            )
            details: dict[str, object] = {
                "endpoint_id": str(endpoint.id),
                "event_type": delivery.event_type,
                "attempt": attempt,
                "status_code": code,
                "error_class": result.error_class,
            }
            if succeeded:  # delivered: audited whoever holds the lease now
                await self._record(tx, tenant_id, AuditAction.WEBHOOK_DELIVER, work, details)
            elif ours and state == "dead":
                await self._record(tx, tenant_id, AuditAction.WEBHOOK_DEAD_LETTER, work, details)
            if ours and disable is not None:
                await self._disable(tx, tenant_id, work, disable)
        outcome = ("retry" if state == "pending" else state) if ours or succeeded else "lost"
        log.info(
            "webhook.attempt",
            delivery_id=str(delivery.id),
            endpoint_id=str(endpoint.id),
            attempt=attempt,
            status_code=code,
            error_class=result.error_class,
            duration_ms=result.duration_ms,
            outcome=outcome,
        )
        return outcome

    async def _fail(self, owner: UUID, tenant_id: UUID, delivery_id: UUID, started: datetime, error: Exception) -> str:
        """Settle a delivery our side failed to prepare, if `owner` still holds its lease: an attempt
        recorded as `internal-error` (the exception's type goes to the log, never its text), retried on the
        schedule, dead-lettered after the last step; held instead, as any other delivery of theirs, if the
        endpoint is disabled or inactive. The endpoint's health is not touched: the receiver did nothing
        wrong, so this neither starts its failing period nor disables it."""
        now = self._clock()
        attempt, outcome, endpoint_id = None, "lost", None
        async with self._db.transaction(tenant_id) as tx:
            leased = await self._store.leased(tx, tenant_id, delivery_id, owner)
            if leased is not None:
                delay = next_delay(
                    leased.tries + 1,
                    self._policy.schedule,
                    retry_after=None,
                    jitter=self._policy.jitter,
                    retry_after_max=self._policy.retry_after_max,
                    rand=self._rand,
                )
                state, held_reason, next_at, action = "pending", None, None, None
                if leased.endpoint_disabled_at is not None or not leased.endpoint_active:
                    state, held_reason, action = "held", "endpoint-disabled", AuditAction.WEBHOOK_HOLD
                elif delay is None:
                    state, action = "dead", AuditAction.WEBHOOK_DEAD_LETTER
                else:
                    next_at = now + timedelta(seconds=delay)
                outcome, endpoint_id = ("retry" if state == "pending" else state), leased.endpoint_id
                attempt = await self._store.fail(
                    tx,
                    tenant_id,
                    delivery_id,
                    owner,
                    attempted_at=started,
                    duration_ms=_ms_since(started, now),
                    error_class=INTERNAL_ERROR,
                    status=state,
                    held_reason=held_reason,
                    next_attempt_at=next_at,
                )
                if action is not None:
                    await self._record_delivery(
                        tx,
                        tenant_id,
                        action,
                        delivery_id,
                        leased.subscriber,
                        leased.patient,
                        {
                            "endpoint_id": str(leased.endpoint_id),
                            "event_type": leased.event_type,
                            "held_reason": held_reason,
                            "attempt": attempt,
                            "error_class": INTERNAL_ERROR,
                        },
                    )
        log.error(
            "webhook.attempt",
            delivery_id=str(delivery_id),
            endpoint_id=None if endpoint_id is None else str(endpoint_id),
            attempt=attempt,
            error_class=INTERNAL_ERROR,
            duration_ms=_ms_since(started, now),
            outcome=outcome,
            exc_info=error,
        )
        return outcome

    async def _disable(self, tx: Tx, tenant_id: UUID, work: DeliveryWork, reason: str) -> None:
        if await self._store.disable(tx, tenant_id, work.endpoint.id, reason):
            await self._audit.record(
                tx,
                AuditEvent.by_system(
                    AuditAction.WEBHOOK_DISABLE,
                    tenant_id,
                    resource_type="WebhookEndpoint",
                    resource_id=str(work.endpoint.id),
                    details={"reason": reason},
                ),
            )
            log.warning("webhook.endpoint_disabled", endpoint_id=str(work.endpoint.id), reason=reason)

    async def _hold(
        self, tx: Tx, tenant_id: UUID, work: DeliveryWork, owner: UUID, reason: str, extra: Mapping[str, object]
    ) -> None:
        await self._store.hold(tx, tenant_id, work.delivery.id, owner, reason)
        details = {
            "endpoint_id": str(work.endpoint.id),
            "event_type": work.delivery.event_type,
            "held_reason": reason,
            **extra,
        }
        await self._record(tx, tenant_id, AuditAction.WEBHOOK_HOLD, work, details)
        log.info("webhook.held", delivery_id=str(work.delivery.id), endpoint_id=str(work.endpoint.id), reason=reason)

    async def _record(
        self, tx: Tx, tenant_id: UUID, action: AuditAction, work: DeliveryWork, details: Mapping[str, object]
    ) -> None:
        await self._record_delivery(
            tx, tenant_id, action, work.delivery.id, work.endpoint.subscriber, work.patient, details
        )

    async def _record_delivery(
        self,
        tx: Tx,
        tenant_id: UUID,
        action: AuditAction,
        delivery_id: UUID,
        subscriber: str,
        patient: str | None,
        details: Mapping[str, object],
    ) -> None:
        await self._audit.record(
            tx,
            AuditEvent.by_system(
                action,
                tenant_id,
                patient=patient,
                resource_type="WebhookDelivery",
                resource_id=str(delivery_id),
                details={"subscriber": subscriber, **{k: v for k, v in details.items() if v is not None}},
            ),
        )


def _ms_since(start: datetime, end: datetime) -> int:
    return max(0, int((end - start).total_seconds() * 1000))
