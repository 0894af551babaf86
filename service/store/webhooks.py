"""Webhook endpoints and their sealed secrets, deliveries (the outbox rows) with leases, attempts, and
inbound receipts. Cross-tenant steps (claim, reap, an inbound endpoint's tenant) go through the
SECURITY DEFINER functions of migration 0007 and return ids only."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from service.store.db import Tx


@dataclass(frozen=True, slots=True)
class EndpointRecord:
    id: UUID
    subscriber: str
    url: bytes = field(repr=False)  # sealed
    event_types: tuple[str, ...]
    active: bool
    created_by: str
    created_at: datetime
    updated_at: datetime
    disabled_at: datetime | None
    disabled_reason: str | None
    failing_since: datetime | None
    signing_public_keys: tuple[str, ...] = ()  # whpk_ keys verifying its v1a signatures now, newest first


@dataclass(frozen=True, slots=True)
class EndpointKeyRecord:
    id: UUID
    endpoint_id: UUID
    purpose: str
    secret: bytes = field(repr=False)  # sealed
    public_key: str | None
    created_at: datetime
    expires_at: datetime | None


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    id: UUID
    endpoint_id: UUID
    event_type: str
    payload: dict[str, Any]
    created_at: datetime
    status: str
    held_reason: str | None
    tries: int
    attempts: int
    next_attempt_at: datetime
    leased: bool
    last_attempt_at: datetime | None
    last_status_code: int | None
    delivered_at: datetime | None


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    attempt: int
    attempted_at: datetime
    duration_ms: int
    status_code: int | None
    error_class: str | None


@dataclass(frozen=True, slots=True)
class DeliveryWork:
    """A leased delivery with what sending it needs: its endpoint, and the patient it concerns."""

    delivery: DeliveryRecord
    endpoint: EndpointRecord
    patient: str | None
    keys: tuple[EndpointKeyRecord, ...] = ()  # the signing secrets valid now (outbound and ed25519), sealed


@dataclass(frozen=True, slots=True)
class LeasedDelivery:
    """A delivery its worker still holds, with what settling it without an attempt needs (nothing sealed)."""

    id: UUID
    endpoint_id: UUID
    event_type: str
    tries: int
    subscriber: str
    patient: str | None
    endpoint_active: bool
    endpoint_disabled_at: datetime | None


@dataclass(frozen=True, slots=True)
class ReceiptRecord:
    body_hash: bytes
    thread_id: UUID
    message_id: UUID


# The v1a public keys in use ride along with the endpoint, so a listing costs one query, not one per row.
_PUBLIC_KEYS = (
    "ARRAY(SELECT k.public_key FROM webhook_endpoint_keys k WHERE k.endpoint_id = e.id AND k.purpose = 'ed25519' "
    "AND (k.expires_at IS NULL OR k.expires_at > now()) ORDER BY k.created_at DESC, k.id) AS signing_public_keys"
)
_ENDPOINT_COLUMNS = (
    "e.id, e.subscriber, e.url, e.event_types, e.active, e.created_by, e.created_at, e.updated_at, "
    f"e.disabled_at, e.disabled_reason, e.failing_since, {_PUBLIC_KEYS}"
)
_DELIVERY_COLUMNS = (
    "o.id, o.endpoint_id, o.event_type, o.payload, o.created_at, o.status, o.held_reason, o.tries, o.attempts, "
    "o.next_attempt_at, o.lease_owner, o.last_attempt_at, o.last_status_code, o.delivered_at"
)


def _endpoint(row: asyncpg.Record, *, joined: bool = False) -> EndpointRecord:
    """An endpoint row; `joined`: read from a delivery's row, where its id and creation time are renamed."""
    return EndpointRecord(
        id=row["endpoint_id" if joined else "id"],
        subscriber=row["subscriber"],
        url=bytes(row["url"]),
        event_types=tuple(row["event_types"]),
        active=row["active"],
        created_by=row["created_by"],
        created_at=row["endpoint_created_at" if joined else "created_at"],
        updated_at=row["updated_at"],
        disabled_at=row["disabled_at"],
        disabled_reason=row["disabled_reason"],
        failing_since=row["failing_since"],
        signing_public_keys=() if joined else tuple(row["signing_public_keys"]),
    )


def _delivery(row: asyncpg.Record) -> DeliveryRecord:
    payload = row["payload"]
    return DeliveryRecord(
        id=row["id"],
        endpoint_id=row["endpoint_id"],
        event_type=row["event_type"],
        payload=json.loads(payload) if isinstance(payload, str) else dict(payload),
        created_at=row["created_at"],
        status=row["status"],
        held_reason=row["held_reason"],
        tries=row["tries"],
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"],
        leased=row["lease_owner"] is not None,
        last_attempt_at=row["last_attempt_at"],
        last_status_code=row["last_status_code"],
        delivered_at=row["delivered_at"],
    )


class WebhookStore:
    # -- endpoints ---------------------------------------------------------------------------------

    _CREATE = """
        INSERT INTO webhook_endpoints (tenant_id, id, subscriber, url, event_types, created_by)
        VALUES ($1, $2, $3, $4, $5, $6)
    """
    _ENDPOINT = f"""
        SELECT {_ENDPOINT_COLUMNS} FROM webhook_endpoints e WHERE e.tenant_id = $1 AND e.id = $2 AND e.active
    """  # noqa: S608
    _ENDPOINT_FOR_UPDATE = _ENDPOINT + " FOR UPDATE"
    _ENDPOINTS = f"""
        SELECT {_ENDPOINT_COLUMNS} FROM webhook_endpoints e
        WHERE e.tenant_id = $1 AND e.active
          AND ($2::text IS NULL OR e.subscriber = $2)
          AND ($3::timestamptz IS NULL OR (e.created_at, e.id) < ($3, $4::uuid))
        ORDER BY e.created_at DESC, e.id DESC LIMIT $5
    """  # noqa: S608
    _UPDATE = """
        UPDATE webhook_endpoints
        SET url = coalesce($3, url), event_types = coalesce($4, event_types), updated_at = now()
        WHERE tenant_id = $1 AND id = $2 AND active
    """
    _DELETE = """
        UPDATE webhook_endpoints SET active = false, updated_at = now() WHERE tenant_id = $1 AND id = $2 AND active
    """
    _DISABLE = """
        UPDATE webhook_endpoints SET disabled_at = now(), disabled_reason = $3, updated_at = now()
        WHERE tenant_id = $1 AND id = $2 AND active AND disabled_at IS NULL
        RETURNING disabled_at
    """
    _ENABLE = """
        UPDATE webhook_endpoints
        SET disabled_at = NULL, disabled_reason = NULL, failing_since = NULL, updated_at = now()
        WHERE tenant_id = $1 AND id = $2 AND active
    """
    # Held because the endpoint was disabled: due again now. Held for consent stays held (see recover).
    _RELEASE_DISABLED = """
        UPDATE webhook_outbox SET status = 'pending', held_reason = NULL, tries = 0, next_attempt_at = now()
        WHERE tenant_id = $1 AND endpoint_id = $2 AND status = 'held' AND held_reason = 'endpoint-disabled'
    """
    _HOLD_PENDING = """
        UPDATE webhook_outbox SET status = 'held', held_reason = 'endpoint-disabled'
        WHERE tenant_id = $1 AND endpoint_id = $2 AND status = 'pending' AND lease_owner IS NULL
    """

    async def create_endpoint(
        self,
        tx: Tx,
        tenant_id: UUID,
        endpoint_id: UUID,
        subscriber: str,
        url: bytes,
        event_types: Sequence[str],
        created_by: str,
    ) -> None:
        await tx.conn.execute(self._CREATE, tenant_id, endpoint_id, subscriber, url, list(event_types), created_by)

    async def endpoint(
        self, tx: Tx, tenant_id: UUID, endpoint_id: UUID, *, lock: bool = False
    ) -> EndpointRecord | None:
        row = await tx.conn.fetchrow(self._ENDPOINT_FOR_UPDATE if lock else self._ENDPOINT, tenant_id, endpoint_id)
        return None if row is None else _endpoint(row)

    async def endpoints(
        self, tx: Tx, tenant_id: UUID, subscriber: str | None, cursor: tuple[datetime, UUID] | None, limit: int
    ) -> list[EndpointRecord]:
        rows = await tx.conn.fetch(
            self._ENDPOINTS,
            tenant_id,
            subscriber,
            cursor[0] if cursor else None,
            cursor[1] if cursor else None,
            limit,
        )
        return [_endpoint(r) for r in rows]

    async def update_endpoint(
        self, tx: Tx, tenant_id: UUID, endpoint_id: UUID, url: bytes | None, event_types: Sequence[str] | None
    ) -> None:
        await tx.conn.execute(
            self._UPDATE, tenant_id, endpoint_id, url, None if event_types is None else list(event_types)
        )

    async def delete_endpoint(self, tx: Tx, tenant_id: UUID, endpoint_id: UUID) -> None:
        """The endpoint stops existing for new events and replies; its deliveries are held for the record."""
        await tx.conn.execute(self._DISABLE, tenant_id, endpoint_id, "admin")
        await tx.conn.execute(self._HOLD_PENDING, tenant_id, endpoint_id)
        await tx.conn.execute(self._DELETE, tenant_id, endpoint_id)

    async def disable(self, tx: Tx, tenant_id: UUID, endpoint_id: UUID, reason: str) -> bool:
        """Disable the endpoint (if it is not already) and hold its pending deliveries."""
        disabled = await tx.conn.fetchval(self._DISABLE, tenant_id, endpoint_id, reason) is not None
        if disabled:
            await tx.conn.execute(self._HOLD_PENDING, tenant_id, endpoint_id)
        return disabled

    async def enable(self, tx: Tx, tenant_id: UUID, endpoint_id: UUID) -> int:
        """Enable the endpoint; its deliveries held while it was disabled are due again. How many."""
        await tx.conn.execute(self._ENABLE, tenant_id, endpoint_id)
        status = await tx.conn.execute(self._RELEASE_DISABLED, tenant_id, endpoint_id)
        return int(status.split()[-1])

    # -- secrets -----------------------------------------------------------------------------------

    _ADD_KEY = """
        INSERT INTO webhook_endpoint_keys (tenant_id, id, endpoint_id, purpose, secret, public_key)
        VALUES ($1, $2, $3, $4, $5, $6)
    """
    # Rotation: the secrets in use now stay valid until `expires_at` (those already expiring keep theirs).
    _EXPIRE_KEYS = """
        UPDATE webhook_endpoint_keys SET expires_at = now() + make_interval(secs => $4)
        WHERE tenant_id = $1 AND endpoint_id = $2 AND purpose = $3 AND expires_at IS NULL
    """
    _KEYS = """
        SELECT id, endpoint_id, purpose, secret, public_key, created_at, expires_at FROM webhook_endpoint_keys
        WHERE tenant_id = $1 AND endpoint_id = $2 AND purpose = ANY($3::text[])
          AND (expires_at IS NULL OR expires_at > now())
        ORDER BY created_at DESC, id
    """

    async def add_key(
        self,
        tx: Tx,
        tenant_id: UUID,
        key_id: UUID,
        endpoint_id: UUID,
        purpose: str,
        secret: bytes,
        public_key: str | None = None,
    ) -> None:
        await tx.conn.execute(self._ADD_KEY, tenant_id, key_id, endpoint_id, purpose, secret, public_key)

    async def expire_keys(
        self, tx: Tx, tenant_id: UUID, endpoint_id: UUID, purpose: str, overlap_seconds: float
    ) -> None:
        await tx.conn.execute(self._EXPIRE_KEYS, tenant_id, endpoint_id, purpose, overlap_seconds)

    async def keys(
        self, tx: Tx, tenant_id: UUID, endpoint_id: UUID, purposes: Sequence[str]
    ) -> list[EndpointKeyRecord]:
        """The endpoint's valid secrets of these purposes, newest first."""
        rows = await tx.conn.fetch(self._KEYS, tenant_id, endpoint_id, list(purposes))
        return [
            EndpointKeyRecord(
                r["id"],
                r["endpoint_id"],
                r["purpose"],
                bytes(r["secret"]),
                r["public_key"],
                r["created_at"],
                r["expires_at"],
            )
            for r in rows
        ]

    # -- the outbox --------------------------------------------------------------------------------

    ENQUEUE = """
        INSERT INTO webhook_outbox (tenant_id, id, endpoint_id, event_type, payload)
        SELECT $1, gen_random_uuid(), e.id, $3, $4::jsonb FROM webhook_endpoints e
        WHERE e.tenant_id = $1 AND e.active AND e.subscriber = ANY($2::text[]) AND $3 = ANY(e.event_types)
    """

    async def enqueue(
        self, tx: Tx, tenant_id: UUID, subscribers: Sequence[str], event_type: str, payload: dict[str, Any]
    ) -> None:
        """One delivery per registered endpoint of `subscribers` that wants `event_type` (ids only). A
        disabled endpoint gets its delivery too: it is held until the endpoint is enabled again."""
        await tx.conn.execute(self.ENQUEUE, tenant_id, list(subscribers), event_type, json.dumps(payload))

    # -- the worker --------------------------------------------------------------------------------

    _CLAIM = "SELECT tenant_id, id FROM bedside_webhook_claim($1, $2, $3)"
    _REAP = "SELECT bedside_webhook_reap()"
    _WORK = f"""
        SELECT {_DELIVERY_COLUMNS}, e.subscriber, e.url, e.event_types, e.active, e.created_by,
               e.created_at AS endpoint_created_at, e.updated_at, e.disabled_at, e.disabled_reason, e.failing_since,
               t.patient,
               ARRAY(SELECT k.id FROM webhook_endpoint_keys k WHERE k.endpoint_id = e.id
                     AND k.purpose IN ('outbound', 'ed25519') AND (k.expires_at IS NULL OR k.expires_at > now())
                     ORDER BY k.created_at DESC, k.id) AS key_ids,
               ARRAY(SELECT k.purpose FROM webhook_endpoint_keys k WHERE k.endpoint_id = e.id
                     AND k.purpose IN ('outbound', 'ed25519') AND (k.expires_at IS NULL OR k.expires_at > now())
                     ORDER BY k.created_at DESC, k.id) AS key_purposes,
               ARRAY(SELECT k.secret FROM webhook_endpoint_keys k WHERE k.endpoint_id = e.id
                     AND k.purpose IN ('outbound', 'ed25519') AND (k.expires_at IS NULL OR k.expires_at > now())
                     ORDER BY k.created_at DESC, k.id) AS key_secrets
        FROM webhook_outbox o
        JOIN webhook_endpoints e ON e.tenant_id = o.tenant_id AND e.id = o.endpoint_id
        LEFT JOIN threads t ON t.tenant_id = o.tenant_id AND t.id = (o.payload ->> 'thread_id')::uuid
        WHERE o.tenant_id = $1 AND o.id = $2 AND o.lease_owner = $3 AND o.status = 'pending'
    """  # noqa: S608
    _HOLD = """
        UPDATE webhook_outbox SET status = 'held', held_reason = $4, lease_owner = NULL, lease_until = NULL
        WHERE tenant_id = $1 AND id = $2 AND lease_owner = $3
    """
    # After an attempt, in one round trip: count it and record it (always), settle the delivery and
    # release the lease (only if the lease is still `owner`'s), and note the endpoint's health.
    _FINISH = """
        WITH old AS (
            SELECT o.id, o.lease_owner IS NOT DISTINCT FROM $3 AS ours FROM webhook_outbox o
            WHERE o.tenant_id = $1 AND o.id = $2
            FOR UPDATE
        ), settled AS (
            UPDATE webhook_outbox o
            SET attempts = o.attempts + 1, last_attempt_at = $4, last_status_code = $6,
                status = CASE WHEN old.ours THEN $8 ELSE o.status END,
                held_reason = CASE WHEN old.ours THEN $9 ELSE o.held_reason END,
                tries = CASE WHEN old.ours THEN o.tries + 1 ELSE o.tries END,
                next_attempt_at = CASE WHEN old.ours THEN coalesce($10, o.next_attempt_at) ELSE o.next_attempt_at END,
                delivered_at = CASE WHEN old.ours AND $8 = 'succeeded' THEN now() ELSE o.delivered_at END,
                lease_owner = CASE WHEN old.ours THEN NULL ELSE o.lease_owner END,
                lease_until = CASE WHEN old.ours THEN NULL ELSE o.lease_until END
            FROM old WHERE o.id = old.id
            RETURNING o.attempts, old.ours
        ), attempt AS (
            INSERT INTO webhook_attempts (tenant_id, delivery_id, attempt, attempted_at, duration_ms, status_code,
                                          error_class, worker)
            SELECT $1, $2, settled.attempts, $4, $5, $6, $7, $3 FROM settled
        ), health AS (
            UPDATE webhook_endpoints SET failing_since = CASE WHEN $12 THEN NULL ELSE coalesce(failing_since, $4) END
            WHERE tenant_id = $1 AND id = $11 AND (failing_since IS NULL) <> $12
        )
        SELECT attempts, ours FROM settled
    """

    async def finish(
        self,
        tx: Tx,
        tenant_id: UUID,
        delivery_id: UUID,
        endpoint_id: UUID,
        owner: UUID,
        *,
        attempted_at: datetime,
        duration_ms: int,
        status_code: int | None,
        error_class: str | None,
        status: str,
        held_reason: str | None = None,
        next_attempt_at: datetime | None = None,
    ) -> tuple[int, bool]:
        """Record an attempt and what it came to (`status`: succeeded, pending again at `next_attempt_at`,
        held, dead): (attempt number, whether the lease was still ours and the delivery settled)."""
        row = await tx.conn.fetchrow(
            self._FINISH,
            tenant_id,
            delivery_id,
            owner,
            attempted_at,
            duration_ms,
            status_code,
            error_class,
            status,
            held_reason,
            next_attempt_at,
            endpoint_id,
            status == "succeeded",
        )
        assert row is not None
        return row["attempts"], row["ours"]

    # When our side failed: the delivery, locked, if `owner` still holds it. This must work whatever broke
    # the attempt, so its thread id is cast only when it has the form of a uuid (`work` casts it bare).
    _LEASED = """
        SELECT o.id, o.endpoint_id, o.event_type, o.tries, e.subscriber, e.active, e.disabled_at,
               (SELECT t.patient FROM threads t
                WHERE t.tenant_id = o.tenant_id
                  AND t.id = CASE WHEN o.payload ->> 'thread_id'
                                       ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
                                  THEN (o.payload ->> 'thread_id')::uuid END) AS patient
        FROM webhook_outbox o
        JOIN webhook_endpoints e ON e.tenant_id = o.tenant_id AND e.id = o.endpoint_id
        WHERE o.tenant_id = $1 AND o.id = $2 AND o.lease_owner = $3 AND o.status = 'pending'
        FOR UPDATE OF o
    """
    # Like _FINISH, but only while the lease is `owner`'s, with no status code, and without the endpoint's
    # health: the failure was ours, not the receiver's.
    _FAIL = """
        WITH settled AS (
            UPDATE webhook_outbox
            SET attempts = attempts + 1, tries = tries + 1, last_attempt_at = $4, last_status_code = NULL,
                status = $7, held_reason = $9, next_attempt_at = coalesce($8, next_attempt_at),
                lease_owner = NULL, lease_until = NULL
            WHERE tenant_id = $1 AND id = $2 AND lease_owner = $3
            RETURNING attempts
        )
        INSERT INTO webhook_attempts (tenant_id, delivery_id, attempt, attempted_at, duration_ms, status_code,
                                      error_class, worker)
        SELECT $1, $2, settled.attempts, $4, $5, NULL, $6, $3 FROM settled
        RETURNING attempt
    """

    async def leased(self, tx: Tx, tenant_id: UUID, delivery_id: UUID, owner: UUID) -> LeasedDelivery | None:
        """The delivery, locked, if `owner` still holds its lease; reads nothing sealed."""
        row = await tx.conn.fetchrow(self._LEASED, tenant_id, delivery_id, owner)
        if row is None:
            return None
        return LeasedDelivery(
            row["id"],
            row["endpoint_id"],
            row["event_type"],
            row["tries"],
            row["subscriber"],
            row["patient"],
            row["active"],
            row["disabled_at"],
        )

    async def fail(
        self,
        tx: Tx,
        tenant_id: UUID,
        delivery_id: UUID,
        owner: UUID,
        *,
        attempted_at: datetime,
        duration_ms: int,
        error_class: str,
        status: str,
        held_reason: str | None = None,
        next_attempt_at: datetime | None = None,
    ) -> int | None:
        """Record an attempt that failed on our side and settle the delivery (`status`: pending again at
        `next_attempt_at`, held for `held_reason`, or dead), releasing the lease: the attempt number, or
        None (and nothing written) if the lease is no longer `owner`'s. The endpoint's `failing_since` is
        not touched."""
        attempt: int | None = await tx.conn.fetchval(
            self._FAIL,
            tenant_id,
            delivery_id,
            owner,
            attempted_at,
            duration_ms,
            error_class,
            status,
            next_attempt_at,
            held_reason,
        )
        return attempt

    async def claim(self, tx: Tx, owner: UUID, lease_seconds: float, limit: int) -> list[tuple[UUID, UUID]]:
        """Lease up to `limit` due deliveries of any tenant: (tenant id, delivery id)."""
        rows = await tx.conn.fetch(self._CLAIM, owner, lease_seconds, limit)
        return [(r["tenant_id"], r["id"]) for r in rows]

    async def reap(self, tx: Tx) -> int:
        """Return expired leases to the queue; how many."""
        value: int = await tx.conn.fetchval(self._REAP)
        return value

    async def work(self, tx: Tx, tenant_id: UUID, delivery_id: UUID, owner: UUID) -> DeliveryWork | None:
        """The delivery if `owner` still holds its lease, with its endpoint and patient."""
        row = await tx.conn.fetchrow(self._WORK, tenant_id, delivery_id, owner)
        if row is None:
            return None
        delivery = _delivery(row)
        endpoint = _endpoint(row, joined=True)
        keys = tuple(
            EndpointKeyRecord(key_id, endpoint.id, purpose, bytes(secret), None, delivery.created_at, None)
            for key_id, purpose, secret in zip(row["key_ids"], row["key_purposes"], row["key_secrets"], strict=True)
        )
        return DeliveryWork(delivery, endpoint, row["patient"], keys)

    async def hold(self, tx: Tx, tenant_id: UUID, delivery_id: UUID, owner: UUID, reason: str) -> None:
        await tx.conn.execute(self._HOLD, tenant_id, delivery_id, owner, reason)

    # -- the admin's view --------------------------------------------------------------------------

    _DELIVERIES = f"""
        SELECT {_DELIVERY_COLUMNS} FROM webhook_outbox o
        WHERE o.tenant_id = $1 AND o.endpoint_id = $2
          AND ($3::text IS NULL OR o.status = $3)
          AND ($4::timestamptz IS NULL OR (o.created_at, o.id) < ($4, $5::uuid))
        ORDER BY o.created_at DESC, o.id DESC LIMIT $6
    """  # noqa: S608
    _DELIVERY = (
        f"SELECT {_DELIVERY_COLUMNS} FROM webhook_outbox o WHERE o.tenant_id = $1 AND o.endpoint_id = $2 AND o.id = $3"  # noqa: S608
    )
    _ATTEMPTS = """
        SELECT attempt, attempted_at, duration_ms, status_code, error_class FROM webhook_attempts
        WHERE tenant_id = $1 AND delivery_id = $2 ORDER BY attempt
    """
    _RESEND = """
        UPDATE webhook_outbox SET status = 'pending', held_reason = NULL, tries = 0, next_attempt_at = now()
        WHERE tenant_id = $1 AND endpoint_id = $2 AND id = $3 AND lease_owner IS NULL
        RETURNING id
    """
    # Recovery: dead-lettered deliveries, and those held for consent (consent is checked again when each
    # is sent, so one still without consent is held again, never sent).
    _RECOVER = """
        UPDATE webhook_outbox SET status = 'pending', held_reason = NULL, tries = 0, next_attempt_at = now()
        WHERE tenant_id = $1 AND endpoint_id = $2 AND created_at >= $3 AND created_at < $4
          AND (status = 'dead' OR (status = 'held' AND held_reason = 'consent'))
    """

    async def deliveries(
        self,
        tx: Tx,
        tenant_id: UUID,
        endpoint_id: UUID,
        status: str | None,
        cursor: tuple[datetime, UUID] | None,
        limit: int,
    ) -> list[DeliveryRecord]:
        rows = await tx.conn.fetch(
            self._DELIVERIES,
            tenant_id,
            endpoint_id,
            status,
            cursor[0] if cursor else None,
            cursor[1] if cursor else None,
            limit,
        )
        return [_delivery(r) for r in rows]

    async def delivery(self, tx: Tx, tenant_id: UUID, endpoint_id: UUID, delivery_id: UUID) -> DeliveryRecord | None:
        row = await tx.conn.fetchrow(self._DELIVERY, tenant_id, endpoint_id, delivery_id)
        return None if row is None else _delivery(row)

    async def attempts(self, tx: Tx, tenant_id: UUID, delivery_id: UUID) -> list[AttemptRecord]:
        rows = await tx.conn.fetch(self._ATTEMPTS, tenant_id, delivery_id)
        return [
            AttemptRecord(r["attempt"], r["attempted_at"], r["duration_ms"], r["status_code"], r["error_class"])
            for r in rows
        ]

    async def resend(self, tx: Tx, tenant_id: UUID, endpoint_id: UUID, delivery_id: UUID) -> bool:
        """Due again now, with a new pass through the schedule; False while an attempt is in flight."""
        return await tx.conn.fetchval(self._RESEND, tenant_id, endpoint_id, delivery_id) is not None

    async def recover(self, tx: Tx, tenant_id: UUID, endpoint_id: UUID, since: datetime, until: datetime) -> int:
        status = await tx.conn.execute(self._RECOVER, tenant_id, endpoint_id, since, until)
        return int(status.split()[-1])

    # -- inbound -----------------------------------------------------------------------------------

    _ENDPOINT_TENANT = "SELECT bedside_webhook_endpoint_tenant($1)"
    # The endpoint still takes replies signed with this secret: enabled, not deleted, the secret valid.
    # FOR SHARE: a disable (or a delete) waits for the reply holding it, and a reply waits for a disable
    # in progress, so no reply commits after a disable that committed first.
    _ACCEPTING = """
        SELECT 1 FROM webhook_endpoints e JOIN webhook_endpoint_keys k ON k.endpoint_id = e.id
        WHERE e.tenant_id = $1 AND e.id = $2 AND e.active AND e.disabled_at IS NULL
          AND k.tenant_id = $1 AND k.id = $3 AND k.purpose = 'inbound'
          AND (k.expires_at IS NULL OR k.expires_at > now())
        FOR SHARE OF e
    """
    _CLAIM_RECEIPT = """
        INSERT INTO inbound_receipts (tenant_id, endpoint_id, webhook_id, body_hash, key_id, thread_id, message_id)
        VALUES ($1, $2, $3, $4, $5, $6, $7)
        ON CONFLICT (endpoint_id, webhook_id) DO NOTHING
        RETURNING 1
    """
    _RECEIPT = """
        SELECT body_hash, thread_id, message_id FROM inbound_receipts
        WHERE tenant_id = $1 AND endpoint_id = $2 AND webhook_id = $3
    """

    async def endpoint_tenant(self, tx: Tx, endpoint_id: UUID) -> UUID | None:
        value: UUID | None = await tx.conn.fetchval(self._ENDPOINT_TENANT, endpoint_id)
        return value

    async def accepting(self, tx: Tx, tenant_id: UUID, endpoint_id: UUID, key_id: UUID) -> bool:
        """Whether the endpoint still takes replies signed with secret `key_id`; holds the endpoint's row
        against a disable or delete until the transaction ends."""
        return await tx.conn.fetchval(self._ACCEPTING, tenant_id, endpoint_id, key_id) is not None

    async def claim_receipt(
        self,
        tx: Tx,
        tenant_id: UUID,
        endpoint_id: UUID,
        webhook_id: str,
        body_hash: bytes,
        key_id: UUID,
        thread_id: UUID,
        message_id: UUID,
    ) -> ReceiptRecord | None:
        """Claim (endpoint, webhook-id) for a new message; None if claimed, else the earlier receipt. A
        concurrent claim of the same id waits here until the first commits or rolls back."""
        claimed = await tx.conn.fetchval(
            self._CLAIM_RECEIPT, tenant_id, endpoint_id, webhook_id, body_hash, key_id, thread_id, message_id
        )
        if claimed is not None:
            return None
        row = await tx.conn.fetchrow(self._RECEIPT, tenant_id, endpoint_id, webhook_id)
        assert row is not None
        return ReceiptRecord(bytes(row["body_hash"]), row["thread_id"], row["message_id"])
