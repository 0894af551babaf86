"""Tenants: a health system or clinic. Nothing ever crosses tenants."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import asyncpg

from service.store.db import Tx


@dataclass(frozen=True, slots=True)
class TenantRecord:
    id: UUID
    slug: str
    created_at: datetime


def _tenant(row: asyncpg.Record) -> TenantRecord:
    return TenantRecord(id=row["id"], slug=row["slug"], created_at=row["created_at"])


class TenantStore:
    _INSERT = """
        INSERT INTO tenants (slug) VALUES ($1)
        ON CONFLICT (slug) DO NOTHING
        RETURNING id, slug, created_at
    """
    _BY_SLUG = "SELECT id, slug, created_at FROM tenants WHERE slug = $1"
    _ALL = "SELECT id, slug, created_at FROM tenants ORDER BY slug"
    _BY_ID = "SELECT id, slug, created_at FROM tenants WHERE id = $1"

    async def create(self, tx: Tx, slug: str) -> TenantRecord | None:
        """The new tenant, or None when the slug is taken."""
        row = await tx.conn.fetchrow(self._INSERT, slug)
        return None if row is None else _tenant(row)

    async def by_slug(self, tx: Tx, slug: str) -> TenantRecord | None:
        row = await tx.conn.fetchrow(self._BY_SLUG, slug)
        return None if row is None else _tenant(row)

    async def by_id(self, tx: Tx, tenant_id: UUID) -> TenantRecord | None:
        row = await tx.conn.fetchrow(self._BY_ID, tenant_id)
        return None if row is None else _tenant(row)

    async def all(self, tx: Tx) -> list[TenantRecord]:
        return [_tenant(row) for row in await tx.conn.fetch(self._ALL)]
