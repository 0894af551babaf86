"""The Merkle log over the audit events: integration (the sequencer's step), proofs, and the
compliance officer's queries.

Integration takes committed outbox rows in one transaction, in outbox order, appends them after the
tree's current size (dense sequence numbers, under the locked tree-state row), stores every perfect
subtree they complete (so proofs need O(log² n) node lookups), and signs a C2SP checkpoint of the new
tree. PostgreSQL sequences are never used to number leaves.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from crypto.checkpoint import CheckpointSigner, format_checkpoint, sign_note
from crypto.merkle import (
    TreeFrontier,
    consistency_proof_from,
    inclusion_proof_from,
    leaf_hash,
    subtree_hasher_from_nodes,
    subtree_ranges,
)
from service.domain.audit import MAX_IDENTIFIER, AuditAction, AuditEvent, AuditRecorder
from service.domain.policy import can_query_audit
from service.domain.principal import Principal, is_plain_text
from service.errors import FieldProblem, InvalidRequestError, NotFoundError
from service.store.audit import AuditStore, CheckpointRecord, EventFilter, LeafRecord
from service.store.db import Conn, Database, Tx

MAX_PAGE = 500


class AuditLog:
    """The sequencer's work: turn committed outbox rows into leaves, nodes and a signed checkpoint."""

    def __init__(self, store: AuditStore, signer: CheckpointSigner, *, origin: str, batch: int = 256) -> None:
        self._store = store
        self._signer = signer
        self._origin = origin
        self.batch = batch

    async def try_lead(self, conn: Conn) -> bool:
        return await self._store.try_lead(conn)

    async def integrate(self, conn: Conn) -> int:
        """Integrate one batch in one transaction; return how many events (0 when none were waiting)."""
        async with conn.transaction():
            claimed = await self._store.claim(conn, self.batch)
            if not claimed:
                return 0
            state = await self._store.state(conn)
            frontier, nodes = TreeFrontier.from_bytes(state.frontier).extend_with_nodes(
                leaf_hash(entry) for _, entry in claimed
            )
            root = frontier.root()
            note = sign_note(format_checkpoint(self._origin, frontier.size, root), self._signer)
            await self._store.integrate(
                conn,
                state.size,
                [event_id for event_id, _ in claimed],
                [(n.level, n.idx, n.hash) for n in nodes],
                frontier.to_bytes(),
                root,
                note,
            )
        return len(claimed)


@dataclass(frozen=True, slots=True)
class EventPage:
    items: list[LeafRecord]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class InclusionProof:
    index: int
    size: int
    leaf_hash: bytes
    path: list[bytes]


@dataclass(frozen=True, slots=True)
class Backlog:
    pending: int
    oldest: datetime | None


def encode_cursor(seq: int, newest_first: bool) -> str:
    return base64.urlsafe_b64encode(f"{'d' if newest_first else 'a'}{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str, newest_first: bool) -> int:
    """The seq a cursor points after; refuses a cursor of the other order or one that is not ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if raw[0] != ("d" if newest_first else "a"):
            raise ValueError
        seq = int(raw[1:])
        if not 0 <= seq <= 2**62:
            raise ValueError
        return seq
    except (ValueError, IndexError, UnicodeDecodeError):
        raise InvalidRequestError(
            [FieldProblem(("cursor",), "cursor", "not a cursor from this listing (or of another order)")]
        ) from None


# The filters that name identifiers the log holds as printable text of at most MAX_IDENTIFIER characters.
_TEXT_FILTERS = ("patient", "actor", "action", "outcome", "resource_type", "resource_id")


def _check_filter(where: EventFilter) -> None:
    """Refuse a text filter that no event can match, because the log never holds such a value: a NUL
    (which PostgreSQL refuses outright), control characters, empty or overlong text."""
    problems = [
        FieldProblem((name,), "text", f"printable text of 1 to {MAX_IDENTIFIER} characters")
        for name in _TEXT_FILTERS
        if (value := getattr(where, name)) is not None and not is_plain_text(value, MAX_IDENTIFIER)
    ]
    if problems:
        raise InvalidRequestError(problems)


def _looked_at(principal: Principal, action: AuditAction, where: EventFilter | None, **details: Any) -> AuditEvent:
    """The audit event of a look at the log: what was asked for (the filter: identifiers and times, which
    `_check_filter` has checked), so the log tells whose trail a compliance officer read or exported. A
    filter on a patient makes the event that patient's too: it appears in their own trail."""
    asked: dict[str, Any] = {}
    if where is not None:
        for name, value in dataclasses.asdict(where).items():
            if value is not None and name != "patient":  # the patient has the event's own column
                asked[f"filter_{name}"] = value.isoformat() if isinstance(value, datetime) else value
    return AuditEvent.by(
        principal,
        action,
        patient=None if where is None else where.patient,
        resource_type="AuditLog",
        details={**details, **asked},
    )


class AuditQueries:
    """What compliance officers ask of the log. Every query is itself audited as `audit:query`."""

    def __init__(self, db: Database, store: AuditStore, recorder: AuditRecorder, *, vkey: str) -> None:
        self._db = db
        self._store = store
        self._recorder = recorder
        self.vkey = vkey

    def _allow(self, principal: Principal) -> None:
        if not can_query_audit(principal):
            raise NotFoundError()

    async def _audited(
        self, tx: Tx, principal: Principal, what: str, where: EventFilter | None = None, **details: Any
    ) -> None:
        await self._recorder.record(tx, _looked_at(principal, AuditAction.AUDIT_QUERY, where, query=what, **details))

    async def events(
        self, principal: Principal, where: EventFilter, *, cursor: str | None, newest_first: bool, limit: int
    ) -> EventPage:
        self._allow(principal)
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidRequestError([FieldProblem(("limit",), "range", f"between 1 and {MAX_PAGE}")])
        _check_filter(where)
        after = None if cursor is None else decode_cursor(cursor, newest_first)
        async with self._db.transaction(principal.tenant_id) as tx:
            items = await self._store.events(
                tx, principal.tenant_id, where, after=after, newest_first=newest_first, limit=limit + 1
            )
            await self._audited(tx, principal, "events", where, returned=min(len(items), limit))
        more = len(items) > limit
        items = items[:limit]
        return EventPage(items, encode_cursor(items[-1].seq, newest_first) if more and items else None)

    async def latest_checkpoint(self, principal: Principal) -> CheckpointRecord:
        self._allow(principal)
        async with self._db.transaction(principal.tenant_id) as tx:
            checkpoint = await self._store.latest_checkpoint(tx)
            await self._audited(tx, principal, "checkpoint")
        if checkpoint is None:
            raise NotFoundError("the audit log is still empty")
        return checkpoint

    async def inclusion(self, principal: Principal, index: int, size: int) -> InclusionProof:
        self._allow(principal)
        async with self._db.transaction(principal.tenant_id) as tx:
            await self._check_size(tx, size, index + 1 if index >= 0 else 0, "size")
            if index < 0 or index >= size:
                raise InvalidRequestError([FieldProblem(("index",), "range", "0 <= index < size")])
            proof = await self._inclusion(tx, index, size)
            await self._audited(tx, principal, "inclusion", index=index, size=size)
        return proof

    async def consistency(self, principal: Principal, old: int, new: int) -> list[bytes]:
        self._allow(principal)
        async with self._db.transaction(principal.tenant_id) as tx:
            await self._check_size(tx, new, 1, "to")
            if not 1 <= old <= new:
                raise InvalidRequestError([FieldProblem(("from",), "range", "1 <= from <= to")])
            wanted = subtree_ranges(lambda h: consistency_proof_from(old, new, h))
            nodes = await self._store.nodes(tx, wanted)
            proof = consistency_proof_from(old, new, subtree_hasher_from_nodes(nodes))
            await self._audited(tx, principal, "consistency", old=old, new=new)
        return proof

    async def leaf_hashes(self, principal: Principal, start: int, end: int) -> list[tuple[int, bytes]]:
        """Leaf hashes of any range (hashes carry nothing of any tenant), to recompute roots."""
        self._allow(principal)
        if not 0 <= start < end or end - start > 10_000:
            raise InvalidRequestError([FieldProblem(("start",), "range", "0 <= start < end, at most 10000 leaves")])
        async with self._db.transaction(principal.tenant_id) as tx:
            hashes = await self._store.leaf_hashes(tx, start, end)
            await self._audited(tx, principal, "leaves", start=start, end=end)
        return hashes

    async def export(
        self, principal: Principal, where: EventFilter, *, page: int = 500
    ) -> tuple[CheckpointRecord | None, AsyncGenerator[tuple[LeafRecord, InclusionProof], None]]:
        """The tenant's events (oldest first) with an inclusion proof of each against the latest
        checkpoint, so the export verifies offline with the log's public key alone. The filter is checked
        here, before the caller starts streaming: the rows are read page by page while it does."""
        self._allow(principal)
        _check_filter(where)
        async with self._db.transaction(principal.tenant_id) as tx:
            checkpoint = await self._store.latest_checkpoint(tx)
            await self._recorder.record(tx, _looked_at(principal, AuditAction.AUDIT_EXPORT, where))

        async def rows() -> AsyncGenerator[tuple[LeafRecord, InclusionProof], None]:
            if checkpoint is None:
                return
            after: int | None = None
            while True:
                async with self._db.transaction(principal.tenant_id) as tx:
                    items = await self._store.events(
                        tx, principal.tenant_id, where, after=after, newest_first=False, limit=page
                    )
                    items = [i for i in items if i.seq < checkpoint.size]
                    proofs = [await self._inclusion(tx, item.seq, checkpoint.size) for item in items]
                for item, proof in zip(items, proofs, strict=True):
                    yield item, proof
                if len(items) < page:
                    return
                after = items[-1].seq

        return checkpoint, rows()

    async def _inclusion(self, tx: Tx, index: int, size: int) -> InclusionProof:
        wanted = subtree_ranges(lambda h: inclusion_proof_from(index, size, h))
        nodes = await self._store.nodes(tx, [*wanted, (0, index)])
        path = inclusion_proof_from(index, size, subtree_hasher_from_nodes(nodes))
        return InclusionProof(index=index, size=size, leaf_hash=nodes[(0, index)], path=path)

    async def _check_size(self, tx: Tx, size: int, minimum: int, field: str) -> None:
        state = await self._store.tree_state(tx)
        if not minimum <= size <= state.size:
            raise InvalidRequestError(
                [FieldProblem((field,), "range", f"the log has {state.size} leaves; ask within it")]
            )

    async def backlog(self) -> Backlog:
        async with self._db.transaction() as tx:
            pending, oldest = await self._store.backlog(tx)
        return Backlog(pending, oldest)
