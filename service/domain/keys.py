"""Key operations: status, KEK rotation (rewrap), retirement, and crypto-shredding.

A KEK is the deployment's: adding a version (`bedside keys rotate`) is an operator's act. Rewrapping is
per tenant and safe to run anywhere, any number of times, concurrently (rows are claimed with
SKIP LOCKED) and after a crash (whatever is still under an older version is simply found again).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from crypto.kek import WrappedKey
from service.domain.audit import AuditAction, AuditEvent, AuditRecorder
from service.domain.keyring import KekClient, PatientKeyring, wrap_aad
from service.domain.policy import can_manage_keys
from service.domain.principal import Principal, is_reference
from service.errors import ConflictError, FieldProblem, InvalidRequestError, NotFoundError
from service.store.data_keys import DataKeyRecord, DataKeyStore, WrapRecord
from service.store.db import Database
from service.store.tenants import TenantRecord, TenantStore

REWRAP_BATCH = 256
Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class VersionCount:
    kek_id: str
    kek_version: int
    wraps: int


@dataclass(frozen=True, slots=True)
class KeyStatus:
    kek_id: str
    primary_version: int
    usable_versions: tuple[int, ...]
    wraps: tuple[VersionCount, ...]
    live_keys: int
    shredded_keys: int

    @property
    def stale_wraps(self) -> int:
        return sum(v.wraps for v in self.wraps if v.kek_id == self.kek_id and v.kek_version < self.primary_version)


@dataclass(frozen=True, slots=True)
class ShredResult:
    patient: str
    dek_id: UUID
    shredded_at: datetime


class KeyOperations:
    def __init__(
        self,
        db: Database,
        tenants: TenantStore,
        keys: DataKeyStore,
        kek: KekClient,
        keyring: PatientKeyring,
        audit: AuditRecorder,
    ) -> None:
        self._db = db
        self._audit = audit
        self._tenants = tenants
        self._keys = keys
        self._kek = kek
        self._keyring = keyring
        self._jobs: dict[UUID, asyncio.Task[int]] = {}

    # -- operator (CLI): every tenant ---------------------------------------------------------------

    async def status(self, tenant: str | None = None) -> KeyStatus:
        """KEK versions and how many DEK wraps each holds (one tenant, or all)."""
        kek_id, primary, usable = await self._kek.usable_versions()
        counts: dict[tuple[str, int], int] = {}
        live = shredded = 0
        for record in await self._tenant_records(tenant):
            async with self._db.transaction(record.id) as tx:
                for count in await self._keys.wrap_counts(tx, record.id):
                    counts[(count.kek_id, count.kek_version)] = (
                        counts.get((count.kek_id, count.kek_version), 0) + count.count
                    )
                tenant_live, tenant_shredded = await self._keys.key_counts(tx, record.id)
            live += tenant_live
            shredded += tenant_shredded
        return KeyStatus(
            kek_id=kek_id,
            primary_version=primary,
            usable_versions=usable,
            wraps=tuple(VersionCount(k, v, n) for (k, v), n in sorted(counts.items())),
            live_keys=live,
            shredded_keys=shredded,
        )

    async def operator_status(self, tenant: str | None = None) -> KeyStatus:
        """`status` for the operator's `bedside keys status`, audited."""
        status = await self.status(tenant)
        await self._audit.record_alone(
            AuditEvent.by_operator(
                AuditAction.KEY_STATUS, resource_type="Kek", details={"tenant": tenant, "kek_id": status.kek_id[:200]}
            )
        )
        return status

    async def add_kek_version(self) -> int:
        """A new KEK version, primary from now on for new wraps. Rewrap to move the old ones."""
        version = await self._kek.call(self._kek.provider.add_version)
        await self._audit.record_alone(
            AuditEvent.by_operator(AuditAction.KEY_ROTATE, resource_type="Kek", details={"kek_version": version})
        )
        return version

    async def rewrap(self, tenant: str | None = None, progress: Progress | None = None) -> int:
        """Move every DEK wrap under an older KEK version to the primary one; return how many moved."""
        before = await self.status(tenant)
        total, done = before.stale_wraps, 0
        if progress:
            progress(done, total)
        for record in await self._tenant_records(tenant):
            moved = await self._rewrap_tenant(record.id, _offset(progress, done, total))
            await self._audit.record_alone(
                AuditEvent.by_operator(
                    AuditAction.KEY_REWRAP, tenant_id=record.id, resource_type="DataKey", details={"rewrapped": moved}
                )
            )
            done += moved
        return done

    async def retire(self, version: int) -> None:
        """Destroy a KEK version for good, once no wrap in any tenant uses it."""
        status = await self.status()
        if version == status.primary_version:
            raise ConflictError("the primary KEK version cannot be retired")
        if version not in status.usable_versions:
            raise ConflictError("no such KEK version, or it is already retired")
        in_use = sum(v.wraps for v in status.wraps if v.kek_id == status.kek_id and v.kek_version == version)
        if in_use:
            raise ConflictError(f"{in_use} data key wrap(s) still use this version: rewrap first")
        # Recorded first: if the record cannot be written, the version is not destroyed.
        await self._audit.record_alone(
            AuditEvent.by_operator(AuditAction.KEY_RETIRE, resource_type="Kek", details={"kek_version": version})
        )
        await self._kek.call(self._kek.provider.retire_version, version)

    async def shred(self, tenant: str, patient: str, confirm: str, actor: str) -> ShredResult:
        """Destroy the patient's data key wraps. Irreversible: `confirm` must repeat the patient."""
        _check_patient(patient, confirm)
        async with self._db.transaction() as tx:
            record = await self._tenants.by_slug(tx, tenant)
        if record is None:
            raise InvalidRequestError([FieldProblem(("tenant",), "unknown", "no such tenant")])
        return await self._shred(record.id, patient, actor, None)

    # -- tenant admin (API): own tenant only --------------------------------------------------------

    async def status_as(self, principal: Principal) -> KeyStatus:
        if not can_manage_keys(principal):
            raise NotFoundError()
        status = await self.status(principal.tenant)
        await self._audit.record_alone(AuditEvent.by(principal, AuditAction.KEY_STATUS, resource_type="DataKey"))
        return status

    async def start_rewrap_as(self, principal: Principal) -> bool:
        """Start rewrapping the admin's tenant in the background; False if it is already running."""
        if not can_manage_keys(principal):
            raise NotFoundError()
        job = self._jobs.get(principal.tenant_id)
        if job is not None and not job.done():
            return False
        await self._audit.record_alone(
            AuditEvent.by(principal, AuditAction.KEY_REWRAP, resource_type="DataKey", details={"started": True})
        )
        self._jobs[principal.tenant_id] = asyncio.create_task(self._rewrap_tenant(principal.tenant_id))
        return True

    def rewrap_running(self, tenant_id: UUID) -> bool:
        job = self._jobs.get(tenant_id)
        return job is not None and not job.done()

    async def shred_as(self, principal: Principal, patient: str, confirm: str) -> ShredResult:
        if not can_manage_keys(principal):
            raise NotFoundError()
        _check_patient(patient, confirm)
        return await self._shred(principal.tenant_id, patient, principal.subject, principal)

    async def close(self) -> None:
        """Stop background rewraps (they resume from where they were on the next run)."""
        for job in self._jobs.values():
            job.cancel()
        await asyncio.gather(*self._jobs.values(), return_exceptions=True)

    # -- internals ----------------------------------------------------------------------------------

    async def _tenant_records(self, tenant: str | None) -> list[TenantRecord]:
        async with self._db.transaction() as tx:
            if tenant is None:
                return await self._tenants.all(tx)
            record = await self._tenants.by_slug(tx, tenant)
        if record is None:
            raise InvalidRequestError([FieldProblem(("tenant",), "unknown", "no such tenant")])
        return [record]

    async def _rewrap_tenant(self, tenant_id: UUID, progress: Callable[[int], object] | None = None) -> int:
        moved = 0
        while True:
            kek_id, primary, _ = await self._kek.usable_versions()
            left = 0
            async with self._db.transaction(tenant_id) as tx:
                batch = await self._keys.stale_wraps(tx, tenant_id, kek_id, primary, REWRAP_BATCH)
                if not batch:
                    left = await self._keys.count_stale(tx, tenant_id, kek_id, primary)
                for candidate in batch:
                    record = DataKeyRecord(candidate.dek_id, candidate.dek_version, candidate.patient, None, ())
                    aad = wrap_aad(tenant_id, record, candidate.patient)
                    old = candidate.wrap
                    secret = await self._kek.unwrap(WrappedKey(old.kek_id, old.kek_version, old.wrapped), aad)
                    new = await self._kek.call(self._kek.provider.wrap, secret, aad)
                    await self._keys.add_wrap(
                        tx, tenant_id, candidate.dek_id, WrapRecord(new.kek_id, new.kek_version, new.wrapped)
                    )
                    await self._keys.remove_wrap(tx, tenant_id, candidate.dek_id, old.kek_id, old.kek_version)
            if not batch:
                if not left:
                    return moved
                # Key rows a concurrent write (or another rewrapper) holds were skipped: come back for them.
                await asyncio.sleep(0.05)
                continue
            moved += len(batch)
            if progress:
                progress(moved)

    async def _shred(self, tenant_id: UUID, patient: str, actor: str, by: Principal | None) -> ShredResult:
        async with self._db.transaction(tenant_id) as tx:
            result = await self._keys.shred(tx, tenant_id, patient, actor)
            if result is None:
                existing = await self._keys.shredded_at(tx, tenant_id, patient)
            else:
                fields = {"patient": patient, "resource_type": "DataKey", "resource_id": str(result[0])}
                event = AuditEvent.by_principal_or_operator(by, AuditAction.KEY_SHRED, tenant_id, **fields)
                await self._audit.record(tx, event)
        if result is None:
            if existing is None:
                if by is not None:  # an admin asking about a patient this tenant does not have: audited
                    await self._audit.record_alone(
                        AuditEvent.by(
                            by,
                            AuditAction.ACCESS_DENIED,
                            patient=patient,
                            resource_type="DataKey",
                            details={"attempt": "shred"},
                        ).denied("not-found")
                    )
                raise NotFoundError("this patient has no stored content to shred")
            raise ConflictError("this patient's data key was already shredded")
        self._keyring.forget(result[0])
        return ShredResult(patient=patient, dek_id=result[0], shredded_at=result[1])


def _offset(progress: Progress | None, base: int, total: int) -> Callable[[int], object] | None:
    """Report a tenant's progress as part of the whole run's."""
    if progress is None:
        return None
    return lambda moved: progress(base + moved, total)


def _check_patient(patient: str, confirm: str) -> None:
    if not is_reference(patient, "Patient"):
        raise InvalidRequestError([FieldProblem(("patient",), "reference", "must be a reference like Patient/123")])
    if confirm != patient:
        raise InvalidRequestError(
            [FieldProblem(("confirm",), "confirmation", "must repeat the patient reference exactly")]
        )
