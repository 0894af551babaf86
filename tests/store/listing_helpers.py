"""A tenant of many threads and the thread listings to take of it: for the listing's plan test and its
benchmark (`tests/perf/bench_listing.py`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import asyncpg

from service.store.db import Tx
from service.store.messaging import MessagingStore

Row = tuple[datetime, UUID]
Cursor = Row | None
PAGE = 51  # the domain asks for one more than the default page of 50, to know whether another follows

# Threads g = 1..n, newest first: thread g was created g seconds before the newest. Its patient is
# Patient/(g % 200); its participants are Practitioner/(g % 500) and CareTeam/(g % 50). Practitioner/7
# is in CareTeam/3 and CareTeam/7, and every thread of his is one of CareTeam/7's too, so a thread can be
# his twice over. Patient/few has three threads, spread over the tenant's history.
_THREADS = """
    WITH tenant AS (INSERT INTO tenants (slug) VALUES ($1) RETURNING id),
    threads AS (
        INSERT INTO threads (tenant_id, id, patient, subject, priority, created_by, created_at)
        SELECT tenant.id, gen_random_uuid(), 'Patient/' || (g % 200), '\\x00'::bytea, 'routine', 'Practitioner/1',
               now() - make_interval(secs => g)
        FROM tenant, generate_series(1, $2::int) AS g
        RETURNING tenant_id, id, created_at
    ),
    numbered AS (
        SELECT tenant_id, id, row_number() OVER (ORDER BY created_at DESC) AS g FROM threads
    )
    INSERT INTO thread_participants (tenant_id, thread_id, participant)
    SELECT tenant_id, id, 'Practitioner/' || (g % 500) FROM numbered
    UNION ALL
    SELECT tenant_id, id, 'CareTeam/' || (g % 50) FROM numbered
"""
_FEW = """
    INSERT INTO threads (tenant_id, id, patient, subject, priority, created_by, created_at)
    SELECT id, gen_random_uuid(), 'Patient/few', '\\x00'::bytea, 'routine', 'Practitioner/1',
           now() - make_interval(secs => g * $2::int / 4 + 0.5)
    FROM tenants, generate_series(1, 3) AS g WHERE slug = $1
"""
_TEAMS = """
    INSERT INTO care_teams (tenant_id, team, created_by)
    SELECT id, 'CareTeam/' || g, 'Practitioner/1' FROM tenants, generate_series(0, 49) AS g WHERE slug = $1
"""
_MEMBERS = """
    INSERT INTO care_team_members (tenant_id, team, member)
    SELECT id, team, 'Practitioner/7' FROM tenants, unnest($2::text[]) AS team WHERE slug = $1
"""


async def load(owner: asyncpg.Connection, slug: str, threads: int) -> UUID:
    """A tenant with `threads` threads (and three more), as above; its id."""
    await owner.execute(_THREADS, slug, threads)
    await owner.execute(_FEW, slug, threads)
    await owner.execute(_TEAMS, slug)
    await owner.execute(_MEMBERS, slug, ["CareTeam/3", "CareTeam/7"])
    await owner.execute("ANALYZE")
    tenant: UUID = await owner.fetchval("SELECT id FROM tenants WHERE slug = $1", slug)
    return tenant


@dataclass(frozen=True)
class Probe:
    """One listing: whose, and from where."""

    name: str
    as_patient: str | None = None
    as_participants: Sequence[str] = ()
    patient: str | None = None
    skip: int = 0  # how many of the caller's threads come before the cursor
    holds: int = PAGE  # how many threads the page holds


PHYSICIAN = ["CareTeam/3", "CareTeam/7", "Practitioner/7"]  # as the domain passes them: his teams, himself
PROBES = [
    Probe("patient, first page", as_patient="Patient/7"),
    Probe("patient, a page after a cursor", as_patient="Patient/7", skip=120),
    Probe("patient with three threads", as_patient="Patient/few", holds=3),
    Probe("physician with two teams, first page", as_participants=PHYSICIAN),
    Probe("physician with two teams, a page after a cursor", as_participants=PHYSICIAN, skip=1000),
    Probe("physician with two teams, one patient's threads", as_participants=PHYSICIAN, patient="Patient/53"),
]

# What a listing must return, written the plain way: the caller's threads of the tenant, as the patient
# or through a participant, newest first, after the cursor.
_EXPECTED = """
    SELECT t.created_at, t.id FROM threads t
    WHERE t.tenant_id = $1
      AND (t.patient = $2 OR t.id IN (SELECT thread_id FROM thread_participants WHERE participant = ANY($3)))
      AND ($4::text IS NULL OR t.patient = $4)
      AND ($5::timestamptz IS NULL OR (t.created_at, t.id) < ($5, $6::uuid))
    ORDER BY t.created_at DESC, t.id DESC LIMIT $7
"""


async def expected(owner: asyncpg.Connection, tenant: UUID, probe: Probe, cursor: Cursor, limit: int) -> list[Row]:
    rows = await owner.fetch(
        _EXPECTED,
        tenant,
        probe.as_patient,
        list(probe.as_participants),
        probe.patient,
        cursor[0] if cursor else None,
        cursor[1] if cursor else None,
        limit,
    )
    return [(r["created_at"], r["id"]) for r in rows]


async def cursor_of(owner: asyncpg.Connection, tenant: UUID, probe: Probe) -> Cursor:
    """The cursor the probe's listing starts from: after its `skip`th thread."""
    return (await expected(owner, tenant, probe, None, probe.skip))[-1] if probe.skip else None


async def list_page(tx: Tx, probe: Probe, cursor: Cursor) -> list[Row]:
    """The probe's page, as the domain asks the store for it (a page of 50 and one more)."""
    assert tx.tenant_id is not None
    listed = await MessagingStore().list_threads(
        tx,
        tx.tenant_id,
        reader=probe.as_patient or "Practitioner/7",
        as_patient=probe.as_patient,
        as_participants=probe.as_participants,
        patient=probe.patient,
        status=None,
        cursor=cursor,
        limit=PAGE,
        hide_sensitive=False,
    )
    return [(item.thread.created_at, item.thread.id) for item in listed]
