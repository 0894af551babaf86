"""The audit outbox, the Merkle log's leaves, nodes, state and checkpoints."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
import structlog

from service.errors import AuditUnavailableError
from service.store.db import Conn, Tx, is_outage

log = structlog.get_logger("bedside.audit")

# Session-level advisory lock key of the one sequencer ("bedside-audit" in spirit, any constant).
SEQUENCER_LOCK = 0x6265647369646501

_EVENT_COLUMNS = (
    "event_id, occurred_at, tenant_id, action, outcome, actor, actor_role, issuer, act_for, patient, "
    "resource_type, resource_id, purpose, request_id, source, details"
)


@dataclass(frozen=True, slots=True)
class OutboxRow:
    event_id: UUID
    occurred_at: datetime
    tenant_id: UUID | None
    action: str
    outcome: str
    actor: str | None
    actor_role: str | None
    issuer: str | None
    act_for: str | None
    patient: str | None
    resource_type: str | None
    resource_id: str | None
    purpose: str | None
    request_id: str | None
    source: str | None
    details: str  # canonical JSON
    entry: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class LeafRecord:
    seq: int
    leaf_hash: bytes
    event: OutboxRow


@dataclass(frozen=True, slots=True)
class TreeState:
    size: int
    frontier: bytes
    root: bytes


@dataclass(frozen=True, slots=True)
class CheckpointRecord:
    size: int
    root: bytes
    note: str
    signed_at: datetime


@dataclass(frozen=True, slots=True)
class EventFilter:
    patient: str | None = None
    actor: str | None = None
    action: str | None = None
    outcome: str | None = None
    resource_type: str | None = None
    resource_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None


def _event(row: asyncpg.Record) -> OutboxRow:
    details = row["details"]
    return OutboxRow(
        event_id=row["event_id"],
        occurred_at=row["occurred_at"],
        tenant_id=row["tenant_id"],
        action=row["action"],
        outcome=row["outcome"],
        actor=row["actor"],
        actor_role=row["actor_role"],
        issuer=row["issuer"],
        act_for=row["act_for"],
        patient=row["patient"],
        resource_type=row["resource_type"],
        resource_id=row["resource_id"],
        purpose=row["purpose"],
        request_id=row["request_id"],
        source=row["source"],
        details=details if isinstance(details, str) else json.dumps(details),
        entry=bytes(row["entry"]),
    )


def _leaf(row: asyncpg.Record) -> LeafRecord:
    return LeafRecord(seq=row["seq"], leaf_hash=bytes(row["leaf_hash"]), event=_event(row))


class AuditStore:
    _INSERT = """
        INSERT INTO audit_outbox (event_id, occurred_at, tenant_id, action, outcome, actor, actor_role, issuer,
                                  act_for, patient, resource_type, resource_id, purpose, request_id, source,
                                  details, entry)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16::jsonb, $17)
    """
    _CLAIM = "SELECT id, entry FROM bedside_audit_claim($1)"
    _APPEND = "SELECT bedside_audit_append($1, $2, $3, $4, $5, $6, $7, $8)"
    _STATE = "SELECT size, frontier, root FROM audit_tree_state"
    _NODES = """
        SELECT n.level, n.idx, n.hash FROM audit_tree_nodes n
        JOIN unnest($1::smallint[], $2::bigint[]) AS w (level, idx) ON n.level = w.level AND n.idx = w.idx
    """
    _LEAF_HASHES = "SELECT idx, hash FROM audit_tree_nodes WHERE level = 0 AND idx >= $1 AND idx < $2 ORDER BY idx"
    _LATEST_CHECKPOINT = "SELECT size, root, note, signed_at FROM audit_checkpoints ORDER BY size DESC LIMIT 1"
    _CHECKPOINT_AT = "SELECT size, root, note, signed_at FROM audit_checkpoints WHERE size = $1"
    _CHECKPOINT_AT_LEAST = (
        "SELECT size, root, note, signed_at FROM audit_checkpoints WHERE size >= $1 ORDER BY size LIMIT 1"
    )
    _BACKLOG = "SELECT pending, oldest FROM bedside_audit_backlog()"
    _LEAF = f"SELECT seq, leaf_hash, {_EVENT_COLUMNS}, entry FROM audit_leaves WHERE tenant_id = $1 AND seq = $2"  # noqa: S608

    async def append(self, tx: Tx, row: OutboxRow) -> None:
        """Insert into the outbox; any failure aborts the transaction: the database's outage as it is (the
        transaction makes it `UnavailableError`), any other `AuditUnavailableError`."""
        try:
            await self._insert(tx, row)
        except (asyncpg.PostgresError, OSError, asyncpg.exceptions.InterfaceError) as exc:
            log.error("audit.write_failed", error_type=type(exc).__name__)
            if is_outage(exc, tx.conn):
                raise
            raise AuditUnavailableError() from None

    async def _insert(self, tx: Tx, row: OutboxRow) -> None:
        await tx.conn.execute(
            self._INSERT,
            row.event_id,
            row.occurred_at,
            row.tenant_id,
            row.action,
            row.outcome,
            row.actor,
            row.actor_role,
            row.issuer,
            row.act_for,
            row.patient,
            row.resource_type,
            row.resource_id,
            row.purpose,
            row.request_id,
            row.source,
            row.details,
            row.entry,
        )

    # -- the sequencer ------------------------------------------------------------------------------

    async def try_lead(self, conn: Conn) -> bool:
        """Take the sequencer's leadership for this session (released when the connection ends)."""
        return bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", SEQUENCER_LOCK))

    async def claim(self, conn: Conn, limit: int) -> list[tuple[int, bytes]]:
        rows = await conn.fetch(self._CLAIM, limit)
        return [(r["id"], bytes(r["entry"])) for r in rows]

    async def state(self, conn: Conn) -> TreeState:
        row = await conn.fetchrow(self._STATE)
        assert row is not None  # the migration inserts the one state row
        return TreeState(row["size"], bytes(row["frontier"]), bytes(row["root"]))

    async def integrate(
        self,
        conn: Conn,
        expected_size: int,
        ids: Sequence[int],
        nodes: Sequence[tuple[int, int, bytes]],
        frontier: bytes,
        root: bytes,
        note: str,
    ) -> int:
        return int(
            await conn.fetchval(
                self._APPEND,
                expected_size,
                list(ids),
                [n[0] for n in nodes],
                [n[1] for n in nodes],
                [n[2] for n in nodes],
                frontier,
                root,
                note,
            )
        )

    async def backlog(self, tx: Tx) -> tuple[int, datetime | None]:
        row = await tx.conn.fetchrow(self._BACKLOG)
        return (row["pending"], row["oldest"]) if row else (0, None)

    # -- reading the log ----------------------------------------------------------------------------

    async def tree_state(self, tx: Tx) -> TreeState:
        return await self.state(tx.conn)

    async def nodes(self, tx: Tx, wanted: Sequence[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        rows = await tx.conn.fetch(self._NODES, [w[0] for w in wanted], [w[1] for w in wanted])
        return {(r["level"], r["idx"]): bytes(r["hash"]) for r in rows}

    async def leaf_hashes(self, tx: Tx, start: int, end: int) -> list[tuple[int, bytes]]:
        return [(r["idx"], bytes(r["hash"])) for r in await tx.conn.fetch(self._LEAF_HASHES, start, end)]

    async def latest_checkpoint(self, tx: Tx) -> CheckpointRecord | None:
        row = await tx.conn.fetchrow(self._LATEST_CHECKPOINT)
        return None if row is None else CheckpointRecord(row["size"], bytes(row["root"]), row["note"], row["signed_at"])

    async def checkpoint(self, tx: Tx, size: int) -> CheckpointRecord | None:
        row = await tx.conn.fetchrow(self._CHECKPOINT_AT, size)
        return None if row is None else CheckpointRecord(row["size"], bytes(row["root"]), row["note"], row["signed_at"])

    async def leaf(self, tx: Tx, tenant_id: UUID, seq: int) -> LeafRecord | None:
        row = await tx.conn.fetchrow(self._LEAF, tenant_id, seq)
        return None if row is None else _leaf(row)

    async def events(
        self, tx: Tx, tenant_id: UUID, where: EventFilter, *, after: int | None, newest_first: bool, limit: int
    ) -> list[LeafRecord]:
        """One page of a tenant's integrated events, by seq, after the cursor `after` (exclusive)."""
        clauses: list[str] = ["tenant_id = $1"]
        args: list[Any] = [tenant_id]

        def add(sql: str, value: Any) -> None:
            args.append(value)
            clauses.append(sql.format(n=len(args)))

        for column in ("patient", "actor", "action", "outcome", "resource_type", "resource_id"):
            value = getattr(where, column)
            if value is not None:
                add(f"{column} = ${{n}}", value)
        if where.since is not None:
            add("occurred_at >= ${n}", where.since)
        if where.until is not None:
            add("occurred_at < ${n}", where.until)
        if after is not None:
            add("seq < ${n}" if newest_first else "seq > ${n}", after)
        args.append(limit)
        where_sql = " AND ".join(clauses)
        order = "DESC" if newest_first else "ASC"
        # Column names come from the fixed tuple above, values only as parameters.
        if where.since is None and where.until is None:
            query = (
                f"SELECT seq, leaf_hash, {_EVENT_COLUMNS}, entry FROM audit_leaves WHERE {where_sql} "  # noqa: S608
                f"ORDER BY seq {order} LIMIT ${len(args)}"
            )
            return [_leaf(r) for r in await tx.conn.fetch(query, *args)]
        # With a time range: first the page's seqs (an index-only scan), then those rows by primary key, so
        # the planner never walks a whole range of rows to filter them.
        seqs = f"SELECT seq FROM audit_leaves WHERE {where_sql} ORDER BY seq {order} LIMIT ${len(args)}"  # noqa: S608
        query = (
            f"SELECT seq, leaf_hash, {_EVENT_COLUMNS}, entry FROM audit_leaves "  # noqa: S608
            f"WHERE tenant_id = $1 AND seq IN ({seqs}) ORDER BY seq {order}"
        )
        return [_leaf(r) for r in await tx.conn.fetch(query, *args)]

    # -- verification (as a role that reads every tenant: the owner) -------------------------------

    async def all_leaves(self, conn: Conn, batch: int = 5000) -> AsyncIterator[tuple[LeafRecord, bytes | None]]:
        """Every leaf in seq order with its stored level-0 node hash, streamed. Call inside a
        (repeatable read) transaction, so the leaves and the checkpoints are one snapshot."""
        query = (
            f"SELECT l.seq, l.leaf_hash, {', '.join('l.' + c for c in _EVENT_COLUMNS.split(', '))}, l.entry, "  # noqa: S608
            "n.hash AS node_hash FROM audit_leaves l "
            "LEFT JOIN audit_tree_nodes n ON n.level = 0 AND n.idx = l.seq ORDER BY l.seq"
        )
        async for row in conn.cursor(query, prefetch=batch):
            node = row["node_hash"]
            yield _leaf(row), None if node is None else bytes(node)

    @contextlib.asynccontextmanager
    async def snapshot(self, conn: Conn) -> AsyncIterator[None]:
        """One read-only, repeatable-read transaction: leaves and checkpoints seen at one instant."""
        async with conn.transaction(readonly=True, isolation="repeatable_read"):
            yield

    async def all_checkpoints(self, conn: Conn) -> list[CheckpointRecord]:
        rows = await conn.fetch("SELECT size, root, note, signed_at FROM audit_checkpoints ORDER BY size")
        return [CheckpointRecord(r["size"], bytes(r["root"]), r["note"], r["signed_at"]) for r in rows]
