"""Readiness: can this process do its work right now (database reachable and taking writes, schema the one
it knows)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from service.errors import UnavailableError
from service.store.audit import AuditStore
from service.store.db import Database, takes_writes
from service.store.migrate import SchemaStore


@dataclass(frozen=True, slots=True)
class Readiness:
    database: bool
    takes_writes: bool
    schema_current: bool
    audit_backlog: int | None = None
    audit_backlog_age_seconds: float | None = None

    @property
    def ready(self) -> bool:
        return self.database and self.takes_writes and self.schema_current


class HealthService:
    def __init__(self, db: Database, schema: SchemaStore, audit: AuditStore) -> None:
        self._db = db
        self._schema = schema
        self._audit = audit

    async def readiness(self) -> Readiness:
        """Ready when the database answers, takes writes, and has the schema this code knows. A server that
        answers reads but refuses writes (a hot standby, an old primary a failover demoted) is not ready:
        every send would be a 503. The audit backlog is reported, not judged: one stuck sequencer must not
        take every replica out of service."""
        try:
            async with self._db.transaction() as tx:
                writable = await takes_writes(tx)
                status = await self._schema.status(tx)
                pending, oldest = await self._audit.backlog(tx) if status.current else (None, None)
        except UnavailableError:
            return Readiness(database=False, takes_writes=False, schema_current=False)
        if not writable:
            # This connection, and any other opened while the server refused writes, would go on refusing
            # them after it takes them again, and then keep the process not ready: replace them all.
            await self._db.replace_connections()
        age = None if oldest is None else max(0.0, (datetime.now(UTC) - oldest).total_seconds())
        return Readiness(
            database=True,
            takes_writes=writable,
            schema_current=status.current,
            audit_backlog=pending,
            audit_backlog_age_seconds=age,
        )
