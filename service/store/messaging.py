"""Threads, participants, messages, read receipts, break-glass, care teams and the notification hook."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from service.errors import AuditUnavailableError
from service.store.audit import OutboxRow
from service.store.db import Tx
from service.store.webhooks import WebhookStore


@dataclass(frozen=True, slots=True)
class ThreadRecord:
    id: UUID
    tenant_id: UUID
    patient: str
    subject: bytes = field(repr=False)
    priority: str
    sensitive: bool
    status: str
    created_by: str
    created_at: datetime
    closed_at: datetime | None
    last_seq: int
    last_activity: datetime
    participants: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ThreadListItem:
    thread: ThreadRecord
    unread: int


@dataclass(frozen=True, slots=True)
class MessageRecord:
    id: UUID
    thread_id: UUID
    seq: int
    sender: str
    sender_role: str
    body: bytes = field(repr=False)
    in_reply_to: UUID | None
    attachment_ids: tuple[UUID, ...]
    created_at: datetime
    recalled_at: datetime | None
    recalled_by: str | None


@dataclass(frozen=True, slots=True)
class ReceiptRecord:
    reader: str
    up_to: int
    read_at: datetime


@dataclass(frozen=True, slots=True)
class BreakGlassRecord:
    id: UUID
    thread_id: UUID
    physician: str
    reason: bytes = field(repr=False)
    opened_at: datetime
    expires_at: datetime
    reviewed_at: datetime | None
    reviewed_by: str | None


_THREAD_COLUMNS = (
    "t.id, t.tenant_id, t.patient, t.subject, t.priority, t.sensitive, t.status, t.created_by, t.created_at, "
    "t.closed_at, t.last_seq, t.last_activity, "
    "ARRAY(SELECT p.participant FROM thread_participants p WHERE p.thread_id = t.id ORDER BY 1) AS participants"
)
_MESSAGE_COLUMNS = (
    "id, thread_id, seq, sender, sender_role, body, in_reply_to, attachment_ids, created_at, recalled_at, recalled_by"
)


def _thread(row: asyncpg.Record) -> ThreadRecord:
    return ThreadRecord(
        id=row["id"],
        tenant_id=row["tenant_id"],
        patient=row["patient"],
        subject=bytes(row["subject"]),
        priority=row["priority"],
        sensitive=row["sensitive"],
        status=row["status"],
        created_by=row["created_by"],
        created_at=row["created_at"],
        closed_at=row["closed_at"],
        last_seq=row["last_seq"],
        last_activity=row["last_activity"],
        participants=tuple(row["participants"]),
    )


def _message(row: asyncpg.Record) -> MessageRecord:
    return MessageRecord(
        id=row["id"],
        thread_id=row["thread_id"],
        seq=row["seq"],
        sender=row["sender"],
        sender_role=row["sender_role"],
        body=bytes(row["body"]),
        in_reply_to=row["in_reply_to"],
        attachment_ids=tuple(row["attachment_ids"]),
        created_at=row["created_at"],
        recalled_at=row["recalled_at"],
        recalled_by=row["recalled_by"],
    )


class MessagingStore:
    _INSERT_THREAD = """
        INSERT INTO threads (tenant_id, id, patient, subject, priority, sensitive, created_by)
        VALUES ($1, $2, $3, $4, $5, $6, $7)
    """
    _INSERT_PARTICIPANTS = """
        INSERT INTO thread_participants (tenant_id, thread_id, participant)
        SELECT $1, $2, unnest($3::text[])
    """
    _THREAD = f"SELECT {_THREAD_COLUMNS} FROM threads t WHERE t.tenant_id = $1 AND t.id = $2"  # noqa: S608
    _TEAMS_OF = """
        SELECT team FROM care_team_members WHERE tenant_id = $1 AND member = $2 AND left_at IS NULL
    """
    _MESSAGES_AFTER = f"""
        SELECT {_MESSAGE_COLUMNS} FROM messages
        WHERE thread_id = $1 AND tenant_id = $2 AND seq > $3 AND seq < $4
        ORDER BY seq LIMIT $5
    """  # noqa: S608
    _MESSAGES_LATEST = f"""
        SELECT * FROM (
            SELECT {_MESSAGE_COLUMNS} FROM messages
            WHERE thread_id = $1 AND tenant_id = $2 AND seq < $3
            ORDER BY seq DESC LIMIT $4
        ) latest ORDER BY seq
    """  # noqa: S608
    _MESSAGE = f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE tenant_id = $1 AND id = $2"  # noqa: S608
    _MESSAGE_IN_THREAD = f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE tenant_id = $1 AND thread_id = $2 AND id = $3"  # noqa: S608
    _RECALL = """
        UPDATE messages SET recalled_at = now(), recalled_by = $3
        WHERE tenant_id = $1 AND id = $2 AND recalled_at IS NULL
        RETURNING recalled_at
    """
    # Recall and read receipts of one thread serialize on its row: "nobody else has read it" stays true
    # until the recall commits.
    _LOCK_THREAD = "SELECT 1 FROM threads WHERE tenant_id = $1 AND id = $2 FOR UPDATE"
    _CLOSE = """
        UPDATE threads SET status = 'closed', closed_by = $3, closed_at = now(), last_activity = now()
        WHERE tenant_id = $1 AND id = $2 AND status = 'open'
        RETURNING closed_at
    """
    _RECEIPT = """
        INSERT INTO read_receipts (tenant_id, thread_id, reader, up_to) VALUES ($1, $2, $3, $4)
        ON CONFLICT (thread_id, reader) DO UPDATE
        SET up_to = GREATEST(read_receipts.up_to, EXCLUDED.up_to), read_at = now()
        RETURNING up_to, read_at
    """
    _RECEIPTS = (
        "SELECT reader, up_to, read_at FROM read_receipts WHERE tenant_id = $1 AND thread_id = $2 ORDER BY reader"
    )
    _READ_BY_OTHERS = """
        SELECT EXISTS (
            SELECT 1 FROM read_receipts WHERE tenant_id = $1 AND thread_id = $2 AND reader <> $3 AND up_to >= $4
        )
    """
    # The caller's threads: as the patient, or as a participant directly or through a care team; newest
    # first, keyset-paginated on (created_at, id), which activity never changes, so no page skips or
    # repeats a thread while messages arrive. Unread = others' messages after the caller's receipt.
    _LIST = f"""
        SELECT {_THREAD_COLUMNS},
               (SELECT count(*) FROM messages m WHERE m.thread_id = t.id AND m.seq > coalesce(r.up_to, 0)
                AND m.sender <> $3) AS unread
        FROM threads t
        LEFT JOIN read_receipts r ON r.thread_id = t.id AND r.reader = $3
        WHERE t.tenant_id = $1
          AND (t.patient = $2 OR EXISTS (
                SELECT 1 FROM thread_participants p WHERE p.thread_id = t.id AND p.participant = ANY($4::text[])))
          AND ($5::text IS NULL OR t.patient = $5)
          AND ($6::text IS NULL OR t.status = $6)
          AND ($7::timestamptz IS NULL OR (t.created_at, t.id) < ($7, $8::uuid))
          AND ($10::boolean IS NOT TRUE OR t.sensitive = false)
        ORDER BY t.created_at DESC, t.id DESC
        LIMIT $9
    """  # noqa: S608
    _OPEN_BREAK_GLASS = """
        INSERT INTO break_glass (tenant_id, id, thread_id, physician, reason, expires_at)
        VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6))
        RETURNING opened_at, expires_at
    """
    _ACTIVE_BREAK_GLASS = """
        SELECT id FROM break_glass
        WHERE tenant_id = $1 AND thread_id = $2 AND physician = $3 AND expires_at > now()
        ORDER BY expires_at DESC LIMIT 1
    """
    _BREAK_GLASS_LIST = """
        SELECT id, thread_id, physician, reason, opened_at, expires_at, reviewed_at, reviewed_by FROM break_glass
        WHERE tenant_id = $1 AND ($2::boolean IS NULL OR (reviewed_at IS NOT NULL) = $2)
        ORDER BY opened_at DESC LIMIT $3
    """
    _REVIEW_BREAK_GLASS = """
        UPDATE break_glass SET reviewed_at = now(), reviewed_by = $3
        WHERE tenant_id = $1 AND id = $2 AND reviewed_at IS NULL
        RETURNING id
    """
    _HOOK = WebhookStore.ENQUEUE  # one outbox row per registered endpoint that wants the event
    _CREATE_TEAM = """
        INSERT INTO care_teams (tenant_id, team, created_by) VALUES ($1, $2, $3)
        ON CONFLICT DO NOTHING RETURNING created_at
    """
    _TEAM_EXISTS = "SELECT EXISTS (SELECT 1 FROM care_teams WHERE tenant_id = $1 AND team = $2)"
    _TEAM_MEMBERS = """
        SELECT member, joined_at, left_at FROM care_team_members WHERE tenant_id = $1 AND team = $2
        ORDER BY joined_at, member
    """

    async def create_thread(
        self,
        tx: Tx,
        tenant_id: UUID,
        thread_id: UUID,
        patient: str,
        subject: bytes,
        priority: str,
        sensitive: bool,
        created_by: str,
        participants: Sequence[str],
    ) -> None:
        await tx.conn.execute(
            self._INSERT_THREAD, tenant_id, thread_id, patient, subject, priority, sensitive, created_by
        )
        await tx.conn.execute(self._INSERT_PARTICIPANTS, tenant_id, thread_id, list(participants))

    async def thread(self, tx: Tx, tenant_id: UUID, thread_id: UUID) -> ThreadRecord | None:
        row = await tx.conn.fetchrow(self._THREAD, tenant_id, thread_id)
        return None if row is None else _thread(row)

    async def teams_of(self, tx: Tx, tenant_id: UUID, member: str) -> frozenset[str]:
        return frozenset(r["team"] for r in await tx.conn.fetch(self._TEAMS_OF, tenant_id, member))

    # One round trip for the whole write of a send: the next sequence number under the thread's row lock,
    # the message, one webhook outbox row per interested endpoint, and the audit event.
    _SEND = """
        WITH next AS (
            UPDATE threads SET last_seq = last_seq + 1, last_activity = now()
            WHERE tenant_id = $1 AND id = $2 AND status = 'open'
            RETURNING last_seq
        ), message AS (
            INSERT INTO messages (tenant_id, thread_id, seq, id, sender, sender_role, body, in_reply_to, attachment_ids)
            SELECT $1, $2, next.last_seq, $3, $4, $5, $6, $7, $8 FROM next
            RETURNING seq, created_at
        ), hook AS (
            INSERT INTO webhook_outbox (tenant_id, id, endpoint_id, event_type, payload)
            SELECT $1, gen_random_uuid(), e.id, 'message.created',
                   jsonb_build_object('thread_id', $2::text, 'message_id', $3::text, 'seq', message.seq)
            FROM webhook_endpoints e, message
            WHERE e.tenant_id = $1 AND e.active AND e.subscriber = ANY($9::text[])
              AND 'message.created' = ANY(e.event_types)
        ), audit AS (
            INSERT INTO audit_outbox (event_id, occurred_at, tenant_id, action, outcome, actor, actor_role, issuer,
                                      act_for, patient, resource_type, resource_id, purpose, request_id, source,
                                      details, entry)
            SELECT $10, $11, $1, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24::jsonb, $25
            FROM message
        )
        SELECT seq, created_at FROM message
    """

    async def send(
        self,
        tx: Tx,
        tenant_id: UUID,
        thread_id: UUID,
        message_id: UUID,
        sender: str,
        sender_role: str,
        body: bytes,
        in_reply_to: UUID | None,
        attachment_ids: Sequence[UUID],
        notify: Sequence[str],
        audit: OutboxRow,
    ) -> tuple[int, datetime] | None:
        """Write a message and everything that goes with it; None when the thread is closed (nothing written)."""
        try:
            row = await tx.conn.fetchrow(
                self._SEND,
                tenant_id,
                thread_id,
                message_id,
                sender,
                sender_role,
                body,
                in_reply_to,
                list(attachment_ids),
                list(notify),
                audit.event_id,
                audit.occurred_at,
                audit.action,
                audit.outcome,
                audit.actor,
                audit.actor_role,
                audit.issuer,
                audit.act_for,
                audit.patient,
                audit.resource_type,
                audit.resource_id,
                audit.purpose,
                audit.request_id,
                audit.source,
                audit.details,
                audit.entry,
            )
        except asyncpg.exceptions.InsufficientPrivilegeError:
            raise AuditUnavailableError() from None  # the audit insert is refused: nothing was written
        return None if row is None else (row["seq"], row["created_at"])

    async def messages(
        self, tx: Tx, tenant_id: UUID, thread_id: UUID, *, after: int | None, before: int | None, limit: int
    ) -> list[MessageRecord]:
        """With `after`: the next `limit` after it; else the latest `limit` before `before` (or the end)."""
        upper = before if before is not None else 2**62
        if after is not None:
            rows = await tx.conn.fetch(self._MESSAGES_AFTER, thread_id, tenant_id, after, upper, limit)
        else:
            rows = await tx.conn.fetch(self._MESSAGES_LATEST, thread_id, tenant_id, upper, limit)
        return [_message(r) for r in rows]

    async def message(self, tx: Tx, tenant_id: UUID, message_id: UUID) -> MessageRecord | None:
        row = await tx.conn.fetchrow(self._MESSAGE, tenant_id, message_id)
        return None if row is None else _message(row)

    async def message_in_thread(
        self, tx: Tx, tenant_id: UUID, thread_id: UUID, message_id: UUID
    ) -> MessageRecord | None:
        row = await tx.conn.fetchrow(self._MESSAGE_IN_THREAD, tenant_id, thread_id, message_id)
        return None if row is None else _message(row)

    async def lock_thread(self, tx: Tx, tenant_id: UUID, thread_id: UUID) -> None:
        await tx.conn.execute(self._LOCK_THREAD, tenant_id, thread_id)

    async def recall(self, tx: Tx, tenant_id: UUID, message_id: UUID, by: str) -> datetime | None:
        value: datetime | None = await tx.conn.fetchval(self._RECALL, tenant_id, message_id, by)
        return value

    async def read_by_others(self, tx: Tx, tenant_id: UUID, thread_id: UUID, sender: str, seq: int) -> bool:
        return bool(await tx.conn.fetchval(self._READ_BY_OTHERS, tenant_id, thread_id, sender, seq))

    async def close(self, tx: Tx, tenant_id: UUID, thread_id: UUID, by: str) -> datetime | None:
        value: datetime | None = await tx.conn.fetchval(self._CLOSE, tenant_id, thread_id, by)
        return value

    async def mark_read(self, tx: Tx, tenant_id: UUID, thread_id: UUID, reader: str, up_to: int) -> ReceiptRecord:
        row = await tx.conn.fetchrow(self._RECEIPT, tenant_id, thread_id, reader, up_to)
        assert row is not None
        return ReceiptRecord(reader, row["up_to"], row["read_at"])

    async def receipts(self, tx: Tx, tenant_id: UUID, thread_id: UUID) -> list[ReceiptRecord]:
        rows = await tx.conn.fetch(self._RECEIPTS, tenant_id, thread_id)
        return [ReceiptRecord(r["reader"], r["up_to"], r["read_at"]) for r in rows]

    async def list_threads(
        self,
        tx: Tx,
        tenant_id: UUID,
        *,
        reader: str,
        as_patient: str | None,
        as_participants: Sequence[str],
        patient: str | None,
        status: str | None,
        cursor: tuple[datetime, UUID] | None,
        limit: int,
        hide_sensitive: bool,
    ) -> list[ThreadListItem]:
        rows = await tx.conn.fetch(
            self._LIST,
            tenant_id,
            as_patient,
            reader,
            list(as_participants),
            patient,
            status,
            cursor[0] if cursor else None,
            cursor[1] if cursor else None,
            limit,
            hide_sensitive,
        )
        return [ThreadListItem(_thread(r), r["unread"]) for r in rows]

    async def open_break_glass(
        self, tx: Tx, tenant_id: UUID, grant_id: UUID, thread_id: UUID, physician: str, reason: bytes, seconds: int
    ) -> tuple[datetime, datetime]:
        row = await tx.conn.fetchrow(
            self._OPEN_BREAK_GLASS, tenant_id, grant_id, thread_id, physician, reason, float(seconds)
        )
        assert row is not None
        return row["opened_at"], row["expires_at"]

    async def active_break_glass(self, tx: Tx, tenant_id: UUID, thread_id: UUID, physician: str) -> UUID | None:
        value: UUID | None = await tx.conn.fetchval(self._ACTIVE_BREAK_GLASS, tenant_id, thread_id, physician)
        return value

    async def break_glass(self, tx: Tx, tenant_id: UUID, reviewed: bool | None, limit: int) -> list[BreakGlassRecord]:
        rows = await tx.conn.fetch(self._BREAK_GLASS_LIST, tenant_id, reviewed, limit)
        return [
            BreakGlassRecord(
                r["id"],
                r["thread_id"],
                r["physician"],
                bytes(r["reason"]),
                r["opened_at"],
                r["expires_at"],
                r["reviewed_at"],
                r["reviewed_by"],
            )
            for r in rows
        ]

    async def review_break_glass(self, tx: Tx, tenant_id: UUID, grant_id: UUID, by: str) -> bool:
        return await tx.conn.fetchval(self._REVIEW_BREAK_GLASS, tenant_id, grant_id, by) is not None

    async def notify(
        self, tx: Tx, tenant_id: UUID, subscribers: Sequence[str], event_type: str, payload: dict[str, Any]
    ) -> None:
        """One webhook outbox row per active endpoint of `subscribers` that wants `event_type` (ids only)."""
        await tx.conn.execute(self._HOOK, tenant_id, list(subscribers), event_type, json.dumps(payload))

    async def create_team(self, tx: Tx, tenant_id: UUID, team: str, by: str) -> bool:
        return await tx.conn.fetchval(self._CREATE_TEAM, tenant_id, team, by) is not None

    async def team_exists(self, tx: Tx, tenant_id: UUID, team: str) -> bool:
        return bool(await tx.conn.fetchval(self._TEAM_EXISTS, tenant_id, team))

    async def team_members(self, tx: Tx, tenant_id: UUID, team: str) -> list[tuple[str, datetime, datetime | None]]:
        return [
            (r["member"], r["joined_at"], r["left_at"])
            for r in await tx.conn.fetch(self._TEAM_MEMBERS, tenant_id, team)
        ]
