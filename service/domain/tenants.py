"""Tenants: created by operators, named by slug, which is what tokens carry in `tid`."""

from __future__ import annotations

from service.errors import AlreadyExistsError, FieldProblem, InvalidRequestError, NotFoundError
from service.settings import is_slug
from service.store.db import Database, Tx
from service.store.tenants import TenantRecord, TenantStore


class TenantService:
    def __init__(self, db: Database, tenants: TenantStore) -> None:
        self._db = db
        self._tenants = tenants

    async def create(self, slug: str) -> TenantRecord:
        """Create a tenant; the slug must be new and look like `acme` or `st-marys`."""
        if not is_slug(slug):
            raise InvalidRequestError(
                [FieldProblem(("name",), "pattern", "lowercase letters, digits and dashes; 2 to 63")]
            )
        async with self._db.transaction() as tx:
            created = await self._tenants.create(tx, slug)
        if created is None:
            raise AlreadyExistsError("a tenant with this name exists")
        return created

    async def ensure(self, slug: str) -> TenantRecord:
        """The tenant, created if missing (embedded mode's `demo`)."""
        async with self._db.transaction() as tx:
            return await self._tenants.create(tx, slug) or await self._require(tx, slug)

    async def get(self, slug: str) -> TenantRecord:
        async with self._db.transaction() as tx:
            return await self._require(tx, slug)

    async def all(self) -> list[TenantRecord]:
        async with self._db.transaction() as tx:
            return await self._tenants.all(tx)

    async def _require(self, tx: Tx, slug: str) -> TenantRecord:
        found = await self._tenants.by_slug(tx, slug)
        if found is None:
            raise NotFoundError("no such tenant")
        return found
