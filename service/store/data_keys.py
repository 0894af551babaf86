"""Data keys (one per patient per tenant) and their KEK wraps. Tenant-owned (row-level security)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from service.store.db import Tx


@dataclass(frozen=True, slots=True)
class WrapRecord:
    kek_id: str
    kek_version: int
    wrapped: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class DataKeyRecord:
    id: UUID
    version: int
    patient: str
    shredded_at: datetime | None
    wraps: tuple[WrapRecord, ...]


@dataclass(frozen=True, slots=True)
class RewrapCandidate:
    dek_id: UUID
    dek_version: int
    patient: str
    wrap: WrapRecord


@dataclass(frozen=True, slots=True)
class WrapCount:
    kek_id: str
    kek_version: int
    count: int


def key_sql(*, tenant: str, where: str, for_write: bool = False) -> str:
    """One patient key as one row: id, version, patient, shredded_at, and its wraps as an array of
    (kek_id, kek_version, wrapped) records. `tenant` and `where` are SQL expressions over `k` (parameters
    or columns of an enclosing statement), never values, so other stores can embed it.

    For writing, the key row is shared-locked until the transaction ends: a shred (which updates the row)
    waits for the write to commit, and a write that waited for a shred sees the key shredded."""
    return f"""
        SELECT k.id, k.version, k.patient, k.shredded_at,
               ARRAY(SELECT ROW(w.kek_id, w.kek_version, w.wrapped) FROM data_key_wraps w
                     WHERE w.tenant_id = k.tenant_id AND w.dek_id = k.id) AS wraps
        FROM data_keys k
        WHERE k.tenant_id = {tenant} AND {where}
        {"FOR SHARE OF k" if for_write else ""}
    """  # noqa: S608 (SQL expressions from constants, no values)


def key_record(
    dek_id: UUID, version: int, patient: str, shredded_at: datetime | None, wraps: Iterable[Iterable[Any]]
) -> DataKeyRecord:
    """A key from `key_sql`'s columns (its wraps as (kek_id, kek_version, wrapped) tuples)."""
    return DataKeyRecord(
        dek_id,
        version,
        patient,
        shredded_at,
        tuple(WrapRecord(kek_id, kek_version, bytes(wrapped)) for kek_id, kek_version, wrapped in wraps),
    )


def _key(row: asyncpg.Record | None) -> DataKeyRecord | None:
    if row is None:
        return None
    return key_record(row["id"], row["version"], row["patient"], row["shredded_at"], row["wraps"])


class DataKeyStore:
    _BY_PATIENT = key_sql(tenant="$1", where="k.patient = $2")
    _BY_PATIENT_FOR_WRITE = key_sql(tenant="$1", where="k.patient = $2", for_write=True)
    _BY_ID = key_sql(tenant="$1", where="k.id = $2")
    _INSERT_KEY = """
        INSERT INTO data_keys (tenant_id, id, version, patient) VALUES ($1, $2, $3, $4)
        ON CONFLICT (tenant_id, patient) DO NOTHING
        RETURNING id
    """
    _INSERT_WRAP = """
        INSERT INTO data_key_wraps (tenant_id, dek_id, kek_id, kek_version, wrapped)
        VALUES ($1, $2, $3, $4, $5)
        ON CONFLICT (dek_id, kek_id, kek_version) DO NOTHING
    """
    _DELETE_WRAP = """
        DELETE FROM data_key_wraps WHERE tenant_id = $1 AND dek_id = $2 AND kek_id = $3 AND kek_version = $4
    """
    _STALE_WRAPS = """
        SELECT k.id, k.version, k.patient, w.kek_id, w.kek_version, w.wrapped
        FROM data_key_wraps w JOIN data_keys k ON k.tenant_id = w.tenant_id AND k.id = w.dek_id
        WHERE w.tenant_id = $1 AND w.kek_id = $2 AND w.kek_version < $3
        ORDER BY w.dek_id, w.kek_version
        LIMIT $4
        FOR UPDATE OF k SKIP LOCKED
    """
    _COUNT_WRAPS = """
        SELECT kek_id, kek_version, count(*) AS n FROM data_key_wraps WHERE tenant_id = $1
        GROUP BY kek_id, kek_version ORDER BY kek_id, kek_version
    """
    _COUNT_KEYS = """
        SELECT count(*) FILTER (WHERE shredded_at IS NULL) AS live, count(*) FILTER (WHERE shredded_at IS NOT NULL)
        AS shredded FROM data_keys WHERE tenant_id = $1
    """
    # Shredding stamps (and so locks) the key row first, then deletes the wraps in a second statement:
    # under READ COMMITTED that statement sees wraps a concurrent rewrap committed while we waited
    # for its lock. Rewrap locks the key row too (stale_wraps), and a trigger refuses wraps of a shredded key.
    _STAMP_SHRED = """
        UPDATE data_keys SET shredded_at = now(), shredded_by = $3
        WHERE tenant_id = $1 AND patient = $2 AND shredded_at IS NULL
        RETURNING id, shredded_at
    """
    _DELETE_WRAPS = "DELETE FROM data_key_wraps WHERE tenant_id = $1 AND dek_id = $2"
    _SHREDDED_AT = "SELECT id, shredded_at FROM data_keys WHERE tenant_id = $1 AND patient = $2"

    async def for_patient(
        self, tx: Tx, tenant_id: UUID, patient: str, *, for_write: bool = False
    ) -> DataKeyRecord | None:
        query = self._BY_PATIENT_FOR_WRITE if for_write else self._BY_PATIENT
        return _key(await tx.conn.fetchrow(query, tenant_id, patient))

    async def by_id(self, tx: Tx, tenant_id: UUID, dek_id: UUID) -> DataKeyRecord | None:
        return _key(await tx.conn.fetchrow(self._BY_ID, tenant_id, dek_id))

    async def create(self, tx: Tx, tenant_id: UUID, dek_id: UUID, version: int, patient: str, wrap: WrapRecord) -> bool:
        """Store a new patient key with its first wrap. False when the patient already has one (a
        concurrent request created it first): the caller reads that one instead."""
        if await tx.conn.fetchval(self._INSERT_KEY, tenant_id, dek_id, version, patient) is None:
            return False
        await self.add_wrap(tx, tenant_id, dek_id, wrap)
        return True

    async def add_wrap(self, tx: Tx, tenant_id: UUID, dek_id: UUID, wrap: WrapRecord) -> None:
        await tx.conn.execute(self._INSERT_WRAP, tenant_id, dek_id, wrap.kek_id, wrap.kek_version, wrap.wrapped)

    async def remove_wrap(self, tx: Tx, tenant_id: UUID, dek_id: UUID, kek_id: str, kek_version: int) -> None:
        await tx.conn.execute(self._DELETE_WRAP, tenant_id, dek_id, kek_id, kek_version)

    async def stale_wraps(
        self, tx: Tx, tenant_id: UUID, kek_id: str, primary_version: int, limit: int
    ) -> list[RewrapCandidate]:
        """Wraps under KEK versions older than the primary, locked for this transaction; rows another
        rewrapper holds are skipped, so several can run at once."""
        rows = await tx.conn.fetch(self._STALE_WRAPS, tenant_id, kek_id, primary_version, limit)
        return [
            RewrapCandidate(
                r["id"], r["version"], r["patient"], WrapRecord(r["kek_id"], r["kek_version"], bytes(r["wrapped"]))
            )
            for r in rows
        ]

    _COUNT_STALE = """
        SELECT count(*) FROM data_key_wraps WHERE tenant_id = $1 AND kek_id = $2 AND kek_version < $3
    """

    async def count_stale(self, tx: Tx, tenant_id: UUID, kek_id: str, primary_version: int) -> int:
        """Wraps under older versions, locked or not (what `stale_wraps` may have skipped)."""
        return int(await tx.conn.fetchval(self._COUNT_STALE, tenant_id, kek_id, primary_version))

    async def wrap_counts(self, tx: Tx, tenant_id: UUID) -> list[WrapCount]:
        rows = await tx.conn.fetch(self._COUNT_WRAPS, tenant_id)
        return [WrapCount(r["kek_id"], r["kek_version"], r["n"]) for r in rows]

    async def key_counts(self, tx: Tx, tenant_id: UUID) -> tuple[int, int]:
        """(live, shredded) patient keys."""
        row = await tx.conn.fetchrow(self._COUNT_KEYS, tenant_id)
        return (row["live"], row["shredded"]) if row else (0, 0)

    async def shred(self, tx: Tx, tenant_id: UUID, patient: str, actor: str) -> tuple[UUID, datetime] | None:
        """Destroy the patient's wraps and stamp the tombstone. None when there was nothing to shred."""
        row = await tx.conn.fetchrow(self._STAMP_SHRED, tenant_id, patient, actor)
        if row is None:
            return None
        await tx.conn.execute(self._DELETE_WRAPS, tenant_id, row["id"])
        return row["id"], row["shredded_at"]

    async def shredded_at(self, tx: Tx, tenant_id: UUID, patient: str) -> tuple[UUID, datetime | None] | None:
        row = await tx.conn.fetchrow(self._SHREDDED_AT, tenant_id, patient)
        return None if row is None else (row["id"], row["shredded_at"])
