"""JWT issuers a tenant trusts, and their public keys. Tenant-owned (row-level security)."""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from service.store.db import Tx


@dataclass(frozen=True, slots=True)
class IssuerKeyRecord:
    issuer: str
    kid: str
    algorithm: str
    public_key_pem: str


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
        SELECT k.public_key_pem FROM issuer_keys k
        WHERE k.tenant_id = $1 AND k.issuer_id = $2 AND k.kid = $3
    """
    _ACTIVE_KEYS = """
        SELECT i.issuer, k.kid, k.algorithm, k.public_key_pem
        FROM issuers i JOIN issuer_keys k ON k.tenant_id = i.tenant_id AND k.issuer_id = i.id
        WHERE i.tenant_id = $1 AND i.issuer = $2 AND k.revoked_at IS NULL
        ORDER BY k.created_at
    """
    _ALL_KEYS = """
        SELECT i.issuer, k.kid, k.algorithm, k.public_key_pem
        FROM issuers i JOIN issuer_keys k ON k.tenant_id = i.tenant_id AND k.issuer_id = i.id
        WHERE i.tenant_id = $1 AND k.revoked_at IS NULL
        ORDER BY i.issuer, k.created_at
    """

    async def add_key(self, tx: Tx, tenant_id: UUID, issuer: str, kid: str, algorithm: str, public_key_pem: str) -> str:
        """Register `issuer` (if new) and its key. Returns "added", "unchanged" (same kid, same key) or
        "conflict" (the kid is taken by another key)."""
        issuer_id = await tx.conn.fetchval(self._UPSERT_ISSUER, tenant_id, issuer)
        if await tx.conn.fetchval(self._INSERT_KEY, tenant_id, issuer_id, kid, algorithm, public_key_pem):
            return "added"
        existing = await tx.conn.fetchval(self._KEY_BY_KID, tenant_id, issuer_id, kid)
        return "unchanged" if existing == public_key_pem else "conflict"

    async def active_keys(self, tx: Tx, tenant_id: UUID, issuer: str) -> list[IssuerKeyRecord]:
        rows = await tx.conn.fetch(self._ACTIVE_KEYS, tenant_id, issuer)
        return [IssuerKeyRecord(r["issuer"], r["kid"], r["algorithm"], r["public_key_pem"]) for r in rows]

    async def all_active_keys(self, tx: Tx, tenant_id: UUID) -> list[IssuerKeyRecord]:
        rows = await tx.conn.fetch(self._ALL_KEYS, tenant_id)
        return [IssuerKeyRecord(r["issuer"], r["kid"], r["algorithm"], r["public_key_pem"]) for r in rows]
