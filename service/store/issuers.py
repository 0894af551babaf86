"""JWT issuers a tenant trusts, and their public keys. Tenant-owned (row-level security)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from uuid import UUID

import asyncpg

from service.store.db import Tx


@dataclass(frozen=True, slots=True)
class IssuerKeyRecord:
    issuer: str
    kid: str
    algorithm: str
    public_key_pem: str
    revoked_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class RevokedKeyRecord:
    key: IssuerKeyRecord
    revoked_at: datetime
    newly_revoked: bool  # False: it already was


class IssuerStore:
    # The application role may not UPDATE issuers, so no DO UPDATE: insert, or find the existing row.
    _UPSERT_ISSUER = """
        WITH inserted AS (
            INSERT INTO issuers (tenant_id, issuer) VALUES ($1, $2)
            ON CONFLICT (tenant_id, issuer) DO NOTHING
            RETURNING id
        )
        SELECT id FROM inserted
        UNION ALL
        SELECT id FROM issuers WHERE tenant_id = $1 AND issuer = $2
        LIMIT 1
    """
    _INSERT_KEY = """
        INSERT INTO issuer_keys (tenant_id, issuer_id, kid, algorithm, public_key_pem)
        VALUES ($1, $2, $3, $4, $5)
        ON CONFLICT (issuer_id, kid) DO NOTHING
        RETURNING id
    """
    _KEY_BY_KID = """
        SELECT k.public_key_pem, k.revoked_at FROM issuer_keys k
        WHERE k.tenant_id = $1 AND k.issuer_id = $2 AND k.kid = $3
    """
    # The same key material revoked anywhere in the tenant (under any issuer or kid).
    _REVOKED_PEM = """
        SELECT EXISTS (
            SELECT 1 FROM issuer_keys WHERE tenant_id = $1 AND public_key_pem = $2 AND revoked_at IS NOT NULL
        )
    """
    # Active and revoked keys alike: the authenticator names a token of a revoked key as such.
    _KEYS = """
        SELECT i.issuer, k.kid, k.algorithm, k.public_key_pem, k.revoked_at
        FROM issuers i JOIN issuer_keys k ON k.tenant_id = i.tenant_id AND k.issuer_id = i.id
        WHERE i.tenant_id = $1 AND i.issuer = $2
        ORDER BY k.created_at
    """
    # Locked, so that of two concurrent revocations the second waits and then finds the key revoked.
    _KEY_FOR_UPDATE = """
        SELECT k.id, i.issuer, k.kid, k.algorithm, k.public_key_pem, k.revoked_at
        FROM issuers i JOIN issuer_keys k ON k.tenant_id = i.tenant_id AND k.issuer_id = i.id
        WHERE i.tenant_id = $1 AND i.issuer = $2 AND k.kid = $3
        FOR UPDATE OF k
    """
    _REVOKE = "UPDATE issuer_keys SET revoked_at = now() WHERE tenant_id = $1 AND id = $2 RETURNING revoked_at"
    _COUNT_ACTIVE = """
        SELECT count(*) FROM issuers i JOIN issuer_keys k ON k.tenant_id = i.tenant_id AND k.issuer_id = i.id
        WHERE i.tenant_id = $1 AND i.issuer = $2 AND k.revoked_at IS NULL
    """
    # Revoked keys too, with when: an operator sees what was revoked, not only what is left.
    _ALL_KEYS = """
        SELECT i.issuer, k.kid, k.algorithm, k.public_key_pem, k.revoked_at
        FROM issuers i JOIN issuer_keys k ON k.tenant_id = i.tenant_id AND k.issuer_id = i.id
        WHERE i.tenant_id = $1
        ORDER BY i.issuer, k.created_at
    """

    async def add_key(self, tx: Tx, tenant_id: UUID, issuer: str, kid: str, algorithm: str, public_key_pem: str) -> str:
        """Register `issuer` (if new) and its key. Returns "added", "unchanged" (same kid, same key),
        "conflict" (the kid is taken by another key) or "revoked" (this key, or this kid, was revoked)."""
        if await tx.conn.fetchval(self._REVOKED_PEM, tenant_id, public_key_pem):
            return "revoked"
        issuer_id = await tx.conn.fetchval(self._UPSERT_ISSUER, tenant_id, issuer)
        # A savepoint, so that the trigger's refusal below leaves the transaction usable (the refusal is
        # audited in it). Two more round trips, on an admin's rare call.
        await tx.conn.execute("SAVEPOINT issuer_key")
        try:
            inserted = await tx.conn.fetchval(self._INSERT_KEY, tenant_id, issuer_id, kid, algorithm, public_key_pem)
        except asyncpg.exceptions.CheckViolationError as exc:
            await tx.conn.execute("ROLLBACK TO SAVEPOINT issuer_key")
            if exc.constraint_name is not None:
                raise  # a column's own CHECK: the domain validates before, so a bug of ours
            return "revoked"  # migration 0013's trigger: this key was revoked since the check above
        await tx.conn.execute("RELEASE SAVEPOINT issuer_key")
        if inserted:
            return "added"
        existing = await tx.conn.fetchrow(self._KEY_BY_KID, tenant_id, issuer_id, kid)
        if existing is not None and existing["revoked_at"] is not None:
            return "revoked"
        return "unchanged" if existing is not None and existing["public_key_pem"] == public_key_pem else "conflict"

    async def keys(self, tx: Tx, tenant_id: UUID, issuer: str) -> list[IssuerKeyRecord]:
        """Every key of `issuer`, revoked ones included (with their `revoked_at`), oldest first."""
        return [_record(r) for r in await tx.conn.fetch(self._KEYS, tenant_id, issuer)]

    async def revoke_key(self, tx: Tx, tenant_id: UUID, issuer: str, kid: str) -> RevokedKeyRecord | None:
        """Revoke the key `kid` of `issuer` (a revoked one stays as it is); None if the issuer has no such key."""
        row = await tx.conn.fetchrow(self._KEY_FOR_UPDATE, tenant_id, issuer, kid)
        if row is None:
            return None
        if row["revoked_at"] is not None:
            return RevokedKeyRecord(_record(row), row["revoked_at"], newly_revoked=False)
        revoked_at = await tx.conn.fetchval(self._REVOKE, tenant_id, row["id"])
        return RevokedKeyRecord(replace(_record(row), revoked_at=revoked_at), revoked_at, newly_revoked=True)

    async def count_active(self, tx: Tx, tenant_id: UUID, issuer: str) -> int:
        return int(await tx.conn.fetchval(self._COUNT_ACTIVE, tenant_id, issuer))

    async def all_keys(self, tx: Tx, tenant_id: UUID) -> list[IssuerKeyRecord]:
        """Every key of every issuer of the tenant, revoked ones included (with their `revoked_at`)."""
        return [_record(r) for r in await tx.conn.fetch(self._ALL_KEYS, tenant_id)]


def _record(row: asyncpg.Record) -> IssuerKeyRecord:
    return IssuerKeyRecord(row["issuer"], row["kid"], row["algorithm"], row["public_key_pem"], row.get("revoked_at"))
