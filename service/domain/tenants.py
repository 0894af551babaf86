"""Tenants: created by operators, named by slug, which is what tokens carry in `tid`."""

from __future__ import annotations

from service.domain.audit import AuditAction, AuditEvent, AuditRecorder
from service.errors import AlreadyExistsError, FieldProblem, InvalidRequestError, NotFoundError
from service.settings import is_slug
from service.store.db import Database, Tx
from service.store.tenants import TenantRecord, TenantStore


class TenantService:
    def __init__(self, db: Database, tenants: TenantStore, audit: AuditRecorder) -> None:
        self._db = db
        self._tenants = tenants
        self._audit = audit

    async def create(self, slug: str) -> TenantRecord:
        """Create a tenant; the slug must be new and look like `acme` or `st-marys`."""
        if not is_slug(slug):
            raise InvalidRequestError(
                [FieldProblem(("name",), "pattern", "lowercase letters, digits and dashes; 2 to 63")]
            )
        async with self._db.transaction() as tx:
            created = await self._tenants.create(tx, slug)
            if created is not None:
                await self._recorded(tx, created)
        if created is None:
            raise AlreadyExistsError("a tenant with this name exists")
        return created

    async def _recorded(self, tx: Tx, tenant: TenantRecord) -> None:
        event = AuditEvent.by_operator(
            AuditAction.TENANT_CREATE, tenant_id=tenant.id, resource_type="Tenant", resource_id=tenant.slug
        )
        await self._audit.record(await self._db.scoped(tx, tenant.id), event)

    async def ensure(self, slug: str) -> TenantRecord:
        """The tenant, created if missing (embedded mode's `demo`)."""
        async with self._db.transaction() as tx:
            created = await self._tenants.create(tx, slug)
            if created is None:
                return await self._require(tx, slug)
            await self._recorded(tx, created)
            return created

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
