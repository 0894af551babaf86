"""Idempotency keys: the first response to (principal, key) is kept and replayed."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import asyncpg

from service.store.db import Tx


@dataclass(frozen=True, slots=True)
class StoredResponse:
    request_hash: bytes
    response: dict[str, Any] | None


# A response known before the work is done (its status and body: the ids the request will create),
# kept with the claim itself.
Outcome = tuple[int, dict[str, Any]]


@dataclass(frozen=True, slots=True)
class IdempotencyClaim:
    """A request's claim of `key` for `principal`, with the request's fingerprint and, when the response
    is known before the work is done, the response (see `claim_sql`)."""

    principal: str
    key: str
    request_hash: bytes
    outcome: Outcome | None = None


def claim_sql(*, tenant: str, principal: str, key: str, request_hash: str, status: str, response: str) -> str:
    """Claim a key (nothing when `key` is NULL); returns a row when this statement claimed it. A
    concurrent claim of the same key waits on the unique index until the first transaction ends, then
    finds its row: exactly one request does the work. The arguments are SQL expressions (parameters),
    never values, so another store can claim in a statement that also reads what the request needs.

    `status` and `response` may be NULL (the request completes the key when it is done), or the response
    already: the claim is in the transaction that does the work, so no other transaction sees the row
    before the work is committed with it, and none ever sees it if the work is rolled back. That writes
    the key's row once instead of twice (a send's hot path)."""
    return f"""
        INSERT INTO idempotency_keys (tenant_id, principal, key, request_hash, status, response)
        SELECT {tenant}, {principal}, {key}, {request_hash}, {status}::integer, {response}::jsonb
        WHERE {key}::text IS NOT NULL
        ON CONFLICT (tenant_id, principal, key) DO NOTHING
        RETURNING 1
    """


def claim_args(claim: IdempotencyClaim | None) -> tuple[str | None, str | None, bytes | None, int | None, str | None]:
    """A claim as the `principal`, `key`, `request_hash`, `status` and `response` parameters of
    `claim_sql`, in that order (all NULL without a claim: nothing is claimed)."""
    if claim is None:
        return (None, None, None, None, None)
    outcome = claim.outcome
    status, response = (None, None) if outcome is None else (outcome[0], json.dumps(outcome[1]))
    return (claim.principal, claim.key, claim.request_hash, status, response)


def _stored(row: asyncpg.Record) -> StoredResponse:
    response = row["response"]
    return StoredResponse(bytes(row["request_hash"]), json.loads(response) if isinstance(response, str) else response)


class IdempotencyStore:
    _CLAIM = claim_sql(tenant="$1", principal="$2", key="$3", request_hash="$4", status="$5", response="$6")
    _EXISTING = """
        SELECT request_hash, response, expires_at <= now() AS expired FROM idempotency_keys
        WHERE tenant_id = $1 AND principal = $2 AND key = $3
    """
    _EXPIRED = """
        DELETE FROM idempotency_keys WHERE tenant_id = $1 AND principal = $2 AND key = $3 AND expires_at <= now()
    """
    _COMPLETE = """
        UPDATE idempotency_keys SET status = $4, response = $5::jsonb
        WHERE tenant_id = $1 AND principal = $2 AND key = $3
    """
    _PURGE = "SELECT bedside_idempotency_purge($1)"

    async def claim(self, tx: Tx, tenant_id: UUID, claim: IdempotencyClaim) -> StoredResponse | None:
        """None when this request owns the key now (kept with `claim.outcome`, if given: else the request
        completes it); else what the first request stored. One round trip for a new key; a key on record
        costs a read, and an expired one is deleted and claimed anew."""
        if await tx.conn.fetchval(self._CLAIM, tenant_id, *claim_args(claim)):
            return None
        return await self.on_record(tx, tenant_id, claim)

    async def on_record(self, tx: Tx, tenant_id: UUID, claim: IdempotencyClaim) -> StoredResponse | None:
        """After a claim of the key found it taken (here, or in a statement of another store): what the
        first request stored; or None when the key had expired, or was purged meanwhile, and this
        request has claimed it anew (as `claim` does)."""
        principal, key = claim.principal, claim.key
        row = await tx.conn.fetchrow(self._EXISTING, tenant_id, principal, key)
        if row is not None and not row["expired"]:
            return _stored(row)
        if row is not None:
            await tx.conn.execute(self._EXPIRED, tenant_id, principal, key)
        if await tx.conn.fetchval(self._CLAIM, tenant_id, *claim_args(claim)):
            return None
        # Claimed by a concurrent request between these statements: the claim waited for it to commit,
        # so what it stored is there to replay (unless it has gone again: then "in use", and a retry).
        row = await tx.conn.fetchrow(self._EXISTING, tenant_id, principal, key)
        return _stored(row) if row is not None else StoredResponse(request_hash=b"", response=None)

    async def complete(
        self, tx: Tx, tenant_id: UUID, principal: str, key: str, status: int, response: dict[str, Any]
    ) -> None:
        await tx.conn.execute(self._COMPLETE, tenant_id, principal, key, status, json.dumps(response))

    async def purge_expired(self, tx: Tx, limit: int) -> int:
        """Delete up to `limit` expired keys of every tenant (a SECURITY DEFINER function: ids and
        deadlines only); returns how many."""
        return int(await tx.conn.fetchval(self._PURGE, limit))
