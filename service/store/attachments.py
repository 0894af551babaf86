"""Attachments and their sealed chunks: one row per file, one row per chunk of its ciphertext."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from uuid import UUID

import asyncpg

from service.store.db import Tx


@dataclass(frozen=True, slots=True)
class AttachmentRecord:
    id: UUID
    tenant_id: UUID
    thread_id: UUID
    uploaded_by: str
    content_type: str
    file_name: bytes = field(repr=False)  # sealed
    size: int
    chunks: int
    complete: bool
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ChunkRecord:
    idx: int
    data: bytes = field(repr=False)  # sealed


_COLUMNS = "id, tenant_id, thread_id, uploaded_by, content_type, file_name, size, chunks, complete, created_at"


def _attachment(row: asyncpg.Record) -> AttachmentRecord:
    return AttachmentRecord(
        id=row["id"],
        tenant_id=row["tenant_id"],
        thread_id=row["thread_id"],
        uploaded_by=row["uploaded_by"],
        content_type=row["content_type"],
        file_name=bytes(row["file_name"]),
        size=row["size"],
        chunks=row["chunks"],
        complete=row["complete"],
        created_at=row["created_at"],
    )


class AttachmentStore:
    _INSERT = """
        INSERT INTO attachments (tenant_id, id, thread_id, uploaded_by, content_type, file_name)
        VALUES ($1, $2, $3, $4, $5, $6)
    """
    # The pool's connections end a transaction left idle for twice the statement timeout (see Database). An
    # upload's is idle between chunks by design, as long as the client takes to send the next 64 KiB: for
    # this transaction only, it may be idle as long as the upload's own limits allow (the domain says how
    # long), so that they, not this, end a slow one.
    _IDLE_UNTIL = "SELECT set_config('idle_in_transaction_session_timeout', $1, true)"
    _INSERT_CHUNK = "INSERT INTO attachment_chunks (tenant_id, attachment_id, idx, data) VALUES ($1, $2, $3, $4)"
    _COMPLETE = f"""
        UPDATE attachments SET size = $3, chunks = $4, complete = true
        WHERE tenant_id = $1 AND id = $2 AND NOT complete
        RETURNING {_COLUMNS}
    """  # noqa: S608
    _ATTACHMENT = f"SELECT {_COLUMNS} FROM attachments WHERE tenant_id = $1 AND id = $2"  # noqa: S608
    # A page of chunks from position `start` on, in order. A gap or an extra row shows up as an index the
    # reader did not expect, which it treats as tampering.
    _CHUNKS = """
        SELECT idx, data FROM attachment_chunks
        WHERE tenant_id = $1 AND attachment_id = $2 AND idx >= $3
        ORDER BY idx LIMIT $4
    """
    # An attachment is withdrawn when messages of its thread carry it and every one of them was recalled:
    # it went with them, at the latest of those recalls. One that no message carries yet is not. The
    # thread's messages are read once, by their (thread_id, seq) key, keeping those that carry any of the
    # attachments asked about: MATERIALIZED, or PostgreSQL inlines the CTE into the per-attachment subquery
    # and scans them once per attachment (20 scans for 20 attachments in EXPLAIN).
    _COMPLETE_IN_THREAD = """
        WITH carried AS MATERIALIZED (
            SELECT unnest(m.attachment_ids) AS id, m.recalled_at FROM messages m
            WHERE m.tenant_id = $1 AND m.thread_id = $2 AND m.attachment_ids && $3::uuid[]
        )
        SELECT a.id,
               (SELECT CASE WHEN bool_and(c.recalled_at IS NOT NULL) THEN max(c.recalled_at) END
                FROM carried c WHERE c.id = a.id) AS withdrawn_at
        FROM attachments a
        WHERE a.tenant_id = $1 AND a.thread_id = $2 AND a.complete AND a.id = ANY($3::uuid[])
    """

    async def idle_for(self, tx: Tx, seconds: float) -> None:
        """Let this transaction sit idle between statements for up to `seconds` (until it ends)."""
        await tx.conn.execute(self._IDLE_UNTIL, str(max(1, round(seconds * 1000))))

    async def create(
        self,
        tx: Tx,
        tenant_id: UUID,
        attachment_id: UUID,
        thread_id: UUID,
        uploaded_by: str,
        content_type: str,
        file_name: bytes,
    ) -> None:
        """The attachment's row, not yet complete (size and chunk count 0)."""
        await tx.conn.execute(self._INSERT, tenant_id, attachment_id, thread_id, uploaded_by, content_type, file_name)

    async def add_chunk(self, tx: Tx, tenant_id: UUID, attachment_id: UUID, idx: int, data: bytes) -> None:
        await tx.conn.execute(self._INSERT_CHUNK, tenant_id, attachment_id, idx, data)

    async def complete(
        self, tx: Tx, tenant_id: UUID, attachment_id: UUID, size: int, chunks: int
    ) -> AttachmentRecord | None:
        """Mark the attachment complete with its plaintext size and chunk count; None if it was already."""
        row = await tx.conn.fetchrow(self._COMPLETE, tenant_id, attachment_id, size, chunks)
        return None if row is None else _attachment(row)

    async def attachment(self, tx: Tx, tenant_id: UUID, attachment_id: UUID) -> AttachmentRecord | None:
        row = await tx.conn.fetchrow(self._ATTACHMENT, tenant_id, attachment_id)
        return None if row is None else _attachment(row)

    async def chunks(self, tx: Tx, tenant_id: UUID, attachment_id: UUID, start: int, limit: int) -> list[ChunkRecord]:
        """Up to `limit` chunks with index >= `start`, in index order."""
        rows = await tx.conn.fetch(self._CHUNKS, tenant_id, attachment_id, start, limit)
        return [ChunkRecord(idx=row["idx"], data=bytes(row["data"])) for row in rows]

    async def complete_in_thread(
        self, tx: Tx, tenant_id: UUID, thread_id: UUID, attachment_ids: Sequence[UUID]
    ) -> dict[UUID, datetime | None]:
        """Which of `attachment_ids` are complete attachments of this thread, each with when it was withdrawn
        (None while a message that carries it stands, or none carries it yet)."""
        rows = await tx.conn.fetch(self._COMPLETE_IN_THREAD, tenant_id, thread_id, list(attachment_ids))
        return {row["id"]: row["withdrawn_at"] for row in rows}

    async def withdrawn_at(self, tx: Tx, tenant_id: UUID, thread_id: UUID, attachment_id: UUID) -> datetime | None:
        """When this complete attachment of the thread was withdrawn, as `complete_in_thread` has it."""
        found = await self.complete_in_thread(tx, tenant_id, thread_id, [attachment_id])
        return found.get(attachment_id)
