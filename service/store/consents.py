"""The consent ledger's events, its derived current state, and care-team membership."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from service.store.db import Tx


@dataclass(frozen=True, slots=True)
class ConsentKey:
    """What one line of consent is about: a patient, a grantee, a scope, and (for some scopes) an item."""

    patient: str
    grantee: str
    scope: str
    item: str = ""


@dataclass(frozen=True, slots=True)
class ConsentEventRecord:
    id: UUID
    tenant_id: UUID
    key: ConsentKey
    purpose: str | None
    kind: str
    revokes: UUID | None
    valid_from: datetime | None
    valid_until: datetime | None
    include_sensitive: bool
    evidence: dict[str, str]
    reason: str | None
    recorded_by: str
    recorded_role: str
    recorded_at: datetime
    version: int
    hash: bytes


@dataclass(frozen=True, slots=True)
class ConsentStateRecord:
    grantee: str
    event_id: UUID
    kind: str
    valid_from: datetime | None
    valid_until: datetime | None
    include_sensitive: bool


_EVENT_COLUMNS = (
    "id, tenant_id, patient, grantee, scope, item, purpose, kind, revokes, valid_from, valid_until, "
    "include_sensitive, evidence, reason, recorded_by, recorded_role, recorded_at, version, hash"
)


def _event(row: asyncpg.Record) -> ConsentEventRecord:
    evidence = row["evidence"]
    return ConsentEventRecord(
        id=row["id"],
        tenant_id=row["tenant_id"],
        key=ConsentKey(row["patient"], row["grantee"], row["scope"], row["item"]),
        purpose=row["purpose"],
        kind=row["kind"],
        revokes=row["revokes"],
        valid_from=row["valid_from"],
        valid_until=row["valid_until"],
        include_sensitive=row["include_sensitive"],
        evidence=json.loads(evidence) if isinstance(evidence, str) else dict(evidence),
        reason=row["reason"],
        recorded_by=row["recorded_by"],
        recorded_role=row["recorded_role"],
        recorded_at=row["recorded_at"],
        version=row["version"],
        hash=bytes(row["hash"]),
    )


def _state(row: asyncpg.Record) -> ConsentStateRecord:
    return ConsentStateRecord(
        row["grantee"], row["event_id"], row["kind"], row["valid_from"], row["valid_until"], row["include_sensitive"]
    )


def current_many_sql(*, tenant: str, patient: str, scope: str, grantees: str) -> str:
    """The current consent states that decide for each of several grantees (a thread's practitioners and
    care teams) about one patient and scope: each grantee's own line and the lines of the care teams it
    is a current member of. Columns: asked, grantee, event_id, kind, valid_from, valid_until,
    include_sensitive. The arguments are SQL expressions (parameters or columns), never values: another
    store embeds this in a larger statement to decide in the same round trip as its own reads."""
    return f"""
        SELECT g.grantee AS asked, s.grantee, s.event_id, s.kind, s.valid_from, s.valid_until, s.include_sensitive
        FROM unnest({grantees}) AS g (grantee)
        JOIN consent_state s ON s.tenant_id = {tenant} AND s.patient = {patient} AND s.scope = {scope} AND s.item = ''
          AND (s.grantee = g.grantee OR s.grantee IN (
                SELECT m.team FROM care_team_members m
                WHERE m.tenant_id = {tenant} AND m.member = g.grantee AND m.left_at IS NULL))
    """  # noqa: S608 (SQL expressions from constants, no values)


def states_by_grantee(grantees: Sequence[str], rows: Iterable[Iterable[Any]]) -> dict[str, list[ConsentStateRecord]]:
    """`current_many_sql`'s rows (records or tuples, in its column order) by the grantee asked about;
    every grantee has an entry, empty when nothing is on record (which decides as no consent)."""
    found: dict[str, list[ConsentStateRecord]] = {g: [] for g in grantees}
    for asked, grantee, event_id, kind, valid_from, valid_until, include_sensitive in rows:
        found[asked].append(ConsentStateRecord(grantee, event_id, kind, valid_from, valid_until, include_sensitive))
    return found


class ConsentStore:
    # One key's appends serialize on a transaction advisory lock of the key; the clock is read after it,
    # so the later commit also has the later recorded_at.
    # The key's lock first, in a statement of its own; then the key's state, read in a new statement (a
    # fresh snapshot under READ COMMITTED) so it sees what the append it waited for committed.
    _LOCK = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))"
    _READ_LOCKED = """
        SELECT clock_timestamp() AS now,
               (SELECT version FROM consent_state
                WHERE tenant_id = $1 AND patient = $2 AND scope = $4 AND grantee = $3 AND item = $5) AS version,
               (SELECT event_id FROM consent_state
                WHERE tenant_id = $1 AND patient = $2 AND scope = $4 AND grantee = $3 AND item = $5) AS current
    """
    _INSERT = f"""
        INSERT INTO consent_events ({_EVENT_COLUMNS})
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13::jsonb, $14, $15, $16, $17, $18, $19)
    """  # noqa: S608 (a constant column list)
    _UPSERT_STATE = """
        INSERT INTO consent_state (tenant_id, patient, grantee, scope, item, event_id, kind, valid_from, valid_until,
                                   include_sensitive, version)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
        ON CONFLICT (tenant_id, patient, scope, grantee, item) DO UPDATE
        SET event_id = EXCLUDED.event_id, kind = EXCLUDED.kind, valid_from = EXCLUDED.valid_from,
            valid_until = EXCLUDED.valid_until, include_sensitive = EXCLUDED.include_sensitive,
            version = EXCLUDED.version
    """
    # Direct consent to the grantee, or to a care team the grantee is a current member of.
    _DECIDE = """
        SELECT s.grantee, s.event_id, s.kind, s.valid_from, s.valid_until, s.include_sensitive
        FROM consent_state s
        WHERE s.tenant_id = $1 AND s.patient = $2 AND s.scope = $3 AND s.item = $5
          AND (s.grantee = $4 OR s.grantee IN (
                SELECT m.team FROM care_team_members m
                WHERE m.tenant_id = $1 AND m.member = $4 AND m.left_at IS NULL))
    """
    # The same question about a moment in the past: the latest event per key recorded by then, and the
    # care teams the grantee belonged to then.
    _DECIDE_AT = f"""
        SELECT DISTINCT ON (e.grantee) {", ".join("e." + c for c in _EVENT_COLUMNS.split(", "))}
        FROM consent_events e
        WHERE e.tenant_id = $1 AND e.patient = $2 AND e.scope = $3 AND e.item = $5 AND e.recorded_at <= $6
          AND (e.grantee = $4 OR e.grantee IN (
                SELECT m.team FROM care_team_members m
                WHERE m.tenant_id = $1 AND m.member = $4 AND m.joined_at <= $6
                  AND (m.left_at IS NULL OR m.left_at > $6)))
        ORDER BY e.grantee, e.version DESC
    """  # noqa: S608 (a constant column list)
    _HISTORY = f"""
        SELECT {_EVENT_COLUMNS} FROM consent_events
        WHERE tenant_id = $1 AND patient = $2 ORDER BY recorded_at, version
    """  # noqa: S608
    _AS_OF = f"""
        SELECT DISTINCT ON (grantee, scope, item) {_EVENT_COLUMNS} FROM consent_events
        WHERE tenant_id = $1 AND patient = $2 AND recorded_at <= $3
        ORDER BY grantee, scope, item, version DESC
    """  # noqa: S608
    _BY_ID = f"SELECT {_EVENT_COLUMNS} FROM consent_events WHERE tenant_id = $1 AND id = $2"  # noqa: S608
    # A team's membership changes serialize on a transaction advisory lock of the team (the app role may
    # not lock care_teams rows: it has no UPDATE on them); the members are then read in a new statement.
    _CURRENT_MEMBERS = "SELECT member FROM care_team_members WHERE tenant_id = $1 AND team = $2 AND left_at IS NULL"
    _JOIN_TEAM = """
        INSERT INTO care_team_members (tenant_id, team, member) VALUES ($1, $2, $3)
        ON CONFLICT DO NOTHING
    """
    _LEAVE_TEAM = """
        UPDATE care_team_members SET left_at = clock_timestamp()
        WHERE tenant_id = $1 AND team = $2 AND member = $3 AND left_at IS NULL
    """

    async def lock_key(self, tx: Tx, tenant_id: UUID, key: ConsentKey) -> tuple[datetime, int, UUID | None]:
        """Serialize appends to `key` for this transaction; return (now, current version, current event)."""
        lock = "|".join(("consent", str(tenant_id), key.patient, key.grantee, key.scope, key.item))
        await tx.conn.execute(self._LOCK, lock)
        row = await tx.conn.fetchrow(self._READ_LOCKED, tenant_id, key.patient, key.grantee, key.scope, key.item)
        assert row is not None
        return row["now"], row["version"] or 0, row["current"]

    async def append(self, tx: Tx, event: ConsentEventRecord) -> None:
        """Insert the event and make it its key's current state (call `lock_key` first)."""
        key = event.key
        await tx.conn.execute(
            self._INSERT,
            event.id,
            event.tenant_id,
            key.patient,
            key.grantee,
            key.scope,
            key.item,
            event.purpose,
            event.kind,
            event.revokes,
            event.valid_from,
            event.valid_until,
            event.include_sensitive,
            json.dumps(event.evidence, sort_keys=True),
            event.reason,
            event.recorded_by,
            event.recorded_role,
            event.recorded_at,
            event.version,
            event.hash,
        )
        await tx.conn.execute(
            self._UPSERT_STATE,
            event.tenant_id,
            key.patient,
            key.grantee,
            key.scope,
            key.item,
            event.id,
            event.kind,
            event.valid_from,
            event.valid_until,
            event.include_sensitive,
            event.version,
        )

    _STATE_OF = """
        SELECT grantee, event_id, kind, valid_from, valid_until, include_sensitive FROM consent_state
        WHERE tenant_id = $1 AND patient = $2 AND scope = $3 AND grantee = $4 AND item = $5
    """

    async def state_of(self, tx: Tx, tenant_id: UUID, key: ConsentKey) -> ConsentStateRecord | None:
        """The key's own current state (not its care teams')."""
        row = await tx.conn.fetchrow(self._STATE_OF, tenant_id, key.patient, key.scope, key.grantee, key.item)
        return None if row is None else _state(row)

    _DECIDE_MANY = current_many_sql(tenant="$1", patient="$2", scope="$3", grantees="$4::text[]")

    async def current_many(
        self, tx: Tx, tenant_id: UUID, patient: str, scope: str, grantees: Sequence[str]
    ) -> dict[str, list[ConsentStateRecord]]:
        rows = await tx.conn.fetch(self._DECIDE_MANY, tenant_id, patient, scope, list(grantees))
        return states_by_grantee(grantees, rows)

    async def current(self, tx: Tx, tenant_id: UUID, key: ConsentKey) -> list[ConsentStateRecord]:
        rows = await tx.conn.fetch(self._DECIDE, tenant_id, key.patient, key.scope, key.grantee, key.item)
        return [_state(r) for r in rows]

    async def at(self, tx: Tx, tenant_id: UUID, key: ConsentKey, moment: datetime) -> list[ConsentEventRecord]:
        rows = await tx.conn.fetch(self._DECIDE_AT, tenant_id, key.patient, key.scope, key.grantee, key.item, moment)
        return [_event(r) for r in rows]

    async def history(self, tx: Tx, tenant_id: UUID, patient: str) -> list[ConsentEventRecord]:
        return [_event(r) for r in await tx.conn.fetch(self._HISTORY, tenant_id, patient)]

    async def latest_as_of(self, tx: Tx, tenant_id: UUID, patient: str, moment: datetime) -> list[ConsentEventRecord]:
        return [_event(r) for r in await tx.conn.fetch(self._AS_OF, tenant_id, patient, moment)]

    async def by_id(self, tx: Tx, tenant_id: UUID, consent_id: UUID) -> ConsentEventRecord | None:
        row = await tx.conn.fetchrow(self._BY_ID, tenant_id, consent_id)
        return None if row is None else _event(row)

    async def lock_team(self, tx: Tx, tenant_id: UUID, team: str) -> None:
        """Serialize membership changes of `team` for this transaction."""
        await tx.conn.execute(self._LOCK, "|".join(("care-team", str(tenant_id), team)))

    async def current_members(self, tx: Tx, tenant_id: UUID, team: str) -> set[str]:
        return {r["member"] for r in await tx.conn.fetch(self._CURRENT_MEMBERS, tenant_id, team)}

    async def join_team(self, tx: Tx, tenant_id: UUID, team: str, member: str) -> None:
        await tx.conn.execute(self._JOIN_TEAM, tenant_id, team, member)

    async def leave_team(self, tx: Tx, tenant_id: UUID, team: str, member: str) -> None:
        await tx.conn.execute(self._LEAVE_TEAM, tenant_id, team, member)
