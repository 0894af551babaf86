"""Readiness: can this process do its work right now (database reachable, schema the one it knows)."""

from __future__ import annotations

from dataclasses import dataclass

from service.errors import UnavailableError
from service.store.db import Database
from service.store.migrate import SchemaStore


@dataclass(frozen=True, slots=True)
class Readiness:
    database: bool
    schema_current: bool

    @property
    def ready(self) -> bool:
        return self.database and self.schema_current


class HealthService:
    def __init__(self, db: Database, schema: SchemaStore) -> None:
        self._db = db
        self._schema = schema

    async def readiness(self) -> Readiness:
        try:
            async with self._db.transaction() as tx:
                status = await self._schema.status(tx)
        except UnavailableError:
            return Readiness(database=False, schema_current=False)
        return Readiness(database=True, schema_current=status.current)
