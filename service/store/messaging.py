"""Threads, participants, messages, read receipts, break-glass, care teams and the notification hook."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import asyncpg

from service.errors import AuditUnavailableError
from service.store.audit import OutboxRow
from service.store.consents import ConsentStateRecord, current_many_sql, states_by_grantee
from service.store.data_keys import DataKeyRecord, key_record, key_sql
from service.store.db import Tx
from service.store.idempotency import IdempotencyClaim, claim_args, claim_sql
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


@dataclass(frozen=True, slots=True)
class SendFacts:
    """What a send decides on, read in one statement: the thread (None if the tenant has no such thread),
    the caller's current care teams (when asked for), the current consent states of the thread's
    practitioners and care teams, the patient's data key, share-locked until the transaction ends (None
    if the patient has none yet), and whether this statement claimed the idempotency key (None: none
    given)."""

    thread: ThreadRecord | None
    teams: frozenset[str]
    consents: dict[str, list[ConsentStateRecord]]
    key: DataKeyRecord | None
    claimed: bool | None


@dataclass(frozen=True, slots=True)
class ReadFacts:
    """What a read of a page of messages needs, in one statement: the thread, the caller's current care
    teams (when asked for), the patient's data key (its shredding checked in this transaction), and the
    page itself. The page is handed out only after the policy allowed the read."""

    thread: ThreadRecord | None
    teams: frozenset[str]
    key: DataKeyRecord | None
    messages: list[MessageRecord]


_THREAD_COLUMNS = (
    "t.id, t.tenant_id, t.patient, t.subject, t.priority, t.sensitive, t.status, t.created_by, t.created_at, "
    "t.closed_at, t.last_seq, t.last_activity, "
    "ARRAY(SELECT p.participant FROM thread_participants p WHERE p.thread_id = t.id ORDER BY 1) AS participants"
)
_MESSAGE_COLUMNS = (
    "id, thread_id, seq, sender, sender_role, body, in_reply_to, attachment_ids, created_at, recalled_at, recalled_by"
)


# The caller's current care teams (none when $member is NULL: the use case does not need them).
_TEAMS_ARRAY = (
    "ARRAY(SELECT m.team FROM care_team_members m WHERE m.tenant_id = $1 AND m.member = {member} "
    "AND m.left_at IS NULL) AS teams"
)


# The listing's cursor when there is none: after it comes every thread (the driver sends datetime.max as
# 'infinity'). Always a bound, never NULL, so that it bounds an index scan in a generic plan too.
_BEFORE_EVERY_THREAD = (datetime.max.replace(tzinfo=UTC), UUID(int=2**128 - 1))


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


def _key_from(row: asyncpg.Record) -> DataKeyRecord | None:
    if row["key_id"] is None:
        return None
    return key_record(row["key_id"], row["key_version"], row["key_patient"], row["key_shredded_at"], row["key_wraps"])


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
    _READ_BY_OTHERS = """
        SELECT EXISTS (
            SELECT 1 FROM read_receipts WHERE tenant_id = $1 AND thread_id = $2 AND reader <> $3 AND up_to >= $4
        )
    """
    # Unread, for a reader: the messages of others after the reader's receipt, recalled ones left out (a
    # tombstone has nothing to read). One definition for a thread's view and for the listing.
    _UNREAD_MESSAGES = (
        "FROM messages m WHERE m.thread_id = {thread} AND m.seq > {up_to} AND m.sender <> {reader} "
        "AND m.recalled_at IS NULL"
    )
    _UNREAD_COUNT = f"SELECT count(*) AS unread {_UNREAD_MESSAGES}"
    _UNREAD = _UNREAD_COUNT.format(
        thread="$2",
        up_to="coalesce((SELECT up_to FROM read_receipts WHERE tenant_id = $1 AND thread_id = $2 AND reader = $3), 0)",
        reader="$3",
    )
    # A reader's view of one thread: their unread count and every receipt, in one statement (a row per
    # receipt, each with the count; one row of NULLs beside it when there is none).
    _READER_STATE = f"""
        SELECT u.unread, r.reader, r.up_to, r.read_at
        FROM ({_UNREAD}) u LEFT JOIN read_receipts r ON r.tenant_id = $1 AND r.thread_id = $2
        ORDER BY r.reader
    """  # noqa: S608
    # The caller's threads: as the patient ($2), or as a participant, directly or through a care team
    # ($4); newest first, keyset-paginated on (created_at, id), which activity never changes, so no page
    # skips or repeats a thread while messages arrive. Unread as above, per thread. With $11 only threads
    # with unread messages, filtered before the LIMIT: a page is full whenever enough of them exist, and
    # the cursor (the page's last thread) continues after the right one.
    #
    # A page reads about a page of index entries per branch, whatever the tenant's size: each branch walks
    # an index in the listing's order from the cursor and stops after $9 threads that pass the filters;
    # the page is the first $9 of them all, and only those are read in full. The patient's threads come
    # from threads_by_patient; a participant's from its entries in thread_participants, one walk each (a
    # thread that comes twice, through the caller and a team, is listed once: UNION). Asked for one
    # patient's threads ($5), a participant's come from that patient's instead, each checked for
    # participation: a care team may be on most of the tenant's threads. Conditions on parameters alone
    # are decided once per execution, and the cursor is never NULL (_BEFORE_EVERY_THREAD), so the generic
    # plan of a cached statement walks the same index ranges as a custom one. Threads the filters (status,
    # sensitive, unread) pass over are still read: threads of the caller's own.
    _LISTING_FILTERS = """
        ($6::text IS NULL OR t.status = $6) AND ($10::boolean IS NOT TRUE OR t.sensitive = false)
        AND ($11::boolean IS NOT TRUE OR EXISTS (SELECT 1 {unread}))
    """.format(
        unread=_UNREAD_MESSAGES.format(
            thread="t.id",
            up_to="coalesce((SELECT r.up_to FROM read_receipts r WHERE r.thread_id = t.id AND r.reader = $3), 0)",
            reader="$3",
        )
    )
    _AFTER_CURSOR = "({created_at}, {id}) < ($7::timestamptz, $8::uuid)"
    _LIST = f"""
        WITH page AS (
            (SELECT t.created_at, t.id FROM threads t
             WHERE t.tenant_id = $1 AND t.patient = $2 AND ($5::text IS NULL OR $5 = $2)
               AND {_AFTER_CURSOR.format(created_at="t.created_at", id="t.id")} AND {_LISTING_FILTERS}
             ORDER BY t.created_at DESC, t.id DESC LIMIT $9)
            UNION
            (SELECT via.created_at, via.id FROM unnest($4::text[]) AS a (participant) CROSS JOIN LATERAL (
                SELECT p.thread_created_at AS created_at, p.thread_id AS id
                FROM thread_participants p JOIN threads t ON t.tenant_id = $1 AND t.id = p.thread_id
                WHERE $5::text IS NULL AND p.tenant_id = $1 AND p.participant = a.participant
                  AND {_AFTER_CURSOR.format(created_at="p.thread_created_at", id="p.thread_id")}
                  AND {_LISTING_FILTERS}
                ORDER BY p.thread_created_at DESC, p.thread_id DESC LIMIT $9) via)
            UNION
            (SELECT t.created_at, t.id FROM threads t
             WHERE cardinality($4::text[]) > 0 AND t.tenant_id = $1 AND t.patient = $5
               AND ARRAY(SELECT p.participant FROM thread_participants p WHERE p.thread_id = t.id) && $4::text[]
               AND {_AFTER_CURSOR.format(created_at="t.created_at", id="t.id")} AND {_LISTING_FILTERS}
             ORDER BY t.created_at DESC, t.id DESC LIMIT $9)
            ORDER BY created_at DESC, id DESC LIMIT $9
        )
        SELECT {_THREAD_COLUMNS}, u.unread
        FROM page
        JOIN threads t ON t.tenant_id = $1 AND t.id = page.id
        LEFT JOIN read_receipts r ON r.thread_id = t.id AND r.reader = $3
        CROSS JOIN LATERAL ({_UNREAD_COUNT.format(thread="t.id", up_to="coalesce(r.up_to, 0)", reader="$3")}) u
        ORDER BY page.created_at DESC, page.id DESC
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
          AND ($4::timestamptz IS NULL OR (opened_at, id) < ($4, $5::uuid))
        ORDER BY opened_at DESC, id DESC LIMIT $3
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

    # Everything a send decides on, in one round trip (see SendFacts). The base row makes the statement
    # return one row even when the thread does not exist, with the claim's outcome. The claim waits, as
    # IdempotencyStore.claim does, for a concurrent request holding the same key; the key row is locked
    # as DataKeyStore.for_patient(for_write=True) locks it. The consent states and wraps come as arrays of
    # anonymous records of scalar types only, which the driver always decodes.
    _SEND_FACTS = f"""
        WITH claim AS (
            {claim_sql(tenant="$1", principal="$5", key="$6", request_hash="$7", status="$8", response="$9")}
        ), thread AS (
            SELECT {_THREAD_COLUMNS} FROM threads t WHERE t.tenant_id = $1 AND t.id = $2
        ), key AS (
            {key_sql(tenant="$1", where="k.patient = (SELECT patient FROM thread)", for_write=True)}
        )
        SELECT thread.*,
               {_TEAMS_ARRAY.format(member="$4")},
               ARRAY(SELECT ROW(c.*) FROM (
                   {current_many_sql(tenant="$1", patient="thread.patient", scope="$3", grantees="thread.participants")}
               ) c) AS consents,
               key.id AS key_id, key.version AS key_version, key.patient AS key_patient,
               key.shredded_at AS key_shredded_at, key.wraps AS key_wraps,
               EXISTS (SELECT 1 FROM claim) AS claimed
        FROM (VALUES (1)) AS base (one)
        LEFT JOIN thread ON true
        LEFT JOIN key ON true
    """  # noqa: S608 (SQL from constants)

    async def send_facts(
        self,
        tx: Tx,
        tenant_id: UUID,
        thread_id: UUID,
        *,
        scope: str,
        teams_of: str | None,
        claim: IdempotencyClaim | None,
    ) -> SendFacts:
        """The thread, `teams_of`'s care teams (if given), the consent states of the participants for
        `scope`, the patient's key (locked for writing) and the idempotency claim (kept with its outcome,
        when it has one), in one round trip."""
        row = await tx.conn.fetchrow(
            self._SEND_FACTS,
            tenant_id,
            thread_id,
            scope,
            teams_of,
            *claim_args(claim),
        )
        assert row is not None  # the base row
        thread = None if row["id"] is None else _thread(row)
        return SendFacts(
            thread=thread,
            teams=frozenset(row["teams"]),
            consents=states_by_grantee(thread.participants if thread else (), row["consents"]),
            key=_key_from(row),
            claimed=None if claim is None else row["claimed"],
        )

    # A page of messages with what reading it needs (see ReadFacts), in one round trip: with `after`
    # ($4), the next $6 after it; else the latest $6 before $5. Both are range scans of the
    # (thread_id, seq) key. The page is an array of the table's own row type, which the driver decodes
    # by name and type (an anonymous record with a uuid[] in it, it may not).
    _READ_FACTS = f"""
        WITH thread AS (
            SELECT {_THREAD_COLUMNS} FROM threads t WHERE t.tenant_id = $1 AND t.id = $2
        ), key AS (
            {key_sql(tenant="$1", where="k.patient = (SELECT patient FROM thread)")}
        )
        SELECT thread.*,
               {_TEAMS_ARRAY.format(member="$3")},
               CASE WHEN $4::bigint IS NULL THEN ARRAY(
                   SELECT latest.m FROM (
                       SELECT m, m.seq FROM messages m
                       WHERE m.thread_id = $2 AND m.tenant_id = $1 AND m.seq < $5
                       ORDER BY m.seq DESC LIMIT $6
                   ) latest ORDER BY latest.seq)
               ELSE ARRAY(
                   SELECT m FROM messages m
                   WHERE m.thread_id = $2 AND m.tenant_id = $1 AND m.seq > $4 AND m.seq < $5
                   ORDER BY m.seq LIMIT $6)
               END AS messages,
               key.id AS key_id, key.version AS key_version, key.patient AS key_patient,
               key.shredded_at AS key_shredded_at, key.wraps AS key_wraps
        FROM thread
        LEFT JOIN key ON true
    """  # noqa: S608 (SQL from constants)

    async def read_facts(
        self,
        tx: Tx,
        tenant_id: UUID,
        thread_id: UUID,
        *,
        teams_of: str | None,
        after: int | None,
        before: int | None,
        limit: int,
    ) -> ReadFacts:
        """The thread, `teams_of`'s care teams (if given), the patient's key and a page of messages (as
        `messages` pages them), in one round trip."""
        upper = before if before is not None else 2**62
        row = await tx.conn.fetchrow(self._READ_FACTS, tenant_id, thread_id, teams_of, after, upper, limit)
        if row is None:
            return ReadFacts(thread=None, teams=frozenset(), key=None, messages=[])
        return ReadFacts(
            thread=_thread(row),
            teams=frozenset(row["teams"]),
            key=_key_from(row),
            messages=[_message(m) for m in row["messages"]],
        )

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

    async def reader_state(
        self, tx: Tx, tenant_id: UUID, thread_id: UUID, reader: str
    ) -> tuple[int, list[ReceiptRecord]]:
        """`reader`'s unread count in the thread, and the thread's receipts (by reader)."""
        rows = await tx.conn.fetch(self._READER_STATE, tenant_id, thread_id, reader)
        receipts = [ReceiptRecord(r["reader"], r["up_to"], r["read_at"]) for r in rows if r["reader"] is not None]
        return int(rows[0]["unread"]), receipts

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
        unread_only: bool = False,
    ) -> list[ThreadListItem]:
        rows = await tx.conn.fetch(
            self._LIST,
            tenant_id,
            as_patient,
            reader,
            list(as_participants),
            patient,
            status,
            *(cursor or _BEFORE_EVERY_THREAD),
            limit,
            hide_sensitive,
            unread_only,
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

    async def break_glass(
        self, tx: Tx, tenant_id: UUID, reviewed: bool | None, after: tuple[datetime, UUID] | None, limit: int
    ) -> list[BreakGlassRecord]:
        """Newest first, keyset-paginated on (opened_at, id): `after` is the previous page's last grant."""
        moment, grant_id = after if after is not None else (None, None)
        rows = await tx.conn.fetch(self._BREAK_GLASS_LIST, tenant_id, reviewed, limit, moment, grant_id)
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
