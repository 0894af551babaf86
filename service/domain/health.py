"""Readiness: can this process do its work right now (database reachable, schema the one it knows)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from service.errors import UnavailableError
from service.store.audit import AuditStore
from service.store.db import Database
from service.store.migrate import SchemaStore


@dataclass(frozen=True, slots=True)
class Readiness:
    database: bool
    schema_current: bool
    audit_backlog: int | None = None
    audit_backlog_age_seconds: float | None = None

    @property
    def ready(self) -> bool:
        return self.database and self.schema_current


class HealthService:
    def __init__(self, db: Database, schema: SchemaStore, audit: AuditStore) -> None:
        self._db = db
        self._schema = schema
        self._audit = audit

    async def readiness(self) -> Readiness:
        """Ready when the database answers with the schema this code knows. The audit backlog is
        reported, not judged: one stuck sequencer must not take every replica out of service."""
        try:
            async with self._db.transaction() as tx:
                status = await self._schema.status(tx)
                pending, oldest = await self._audit.backlog(tx) if status.current else (None, None)
        except UnavailableError:
            return Readiness(database=False, schema_current=False)
        age = None if oldest is None else max(0.0, (datetime.now(UTC) - oldest).total_seconds())
        return Readiness(
            database=True, schema_current=status.current, audit_backlog=pending, audit_backlog_age_seconds=age
        )
