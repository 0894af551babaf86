"""Envelope encryption wired to the database: per-patient data keys, rotation, crypto-shredding."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from crypto.errors import DecryptionError
from service.errors import ConflictError, InvalidRequestError, NotFoundError, ShreddedError
from service.store.data_keys import DataKeyStore
from tests.conftest import Services, build_key_services
from tests.support import canary


async def _tenant(services: Services, slug: str = "acme"):
    return await services.tenants.create(slug)


def _context(row: str) -> dict[str, str]:
    return {"column": "test.body", "row": row}


async def _seal(services: Services, tenant, patient: str, text: str, row: str = "1") -> bytes:
    async with services.db.transaction(tenant.id) as tx:
        return await services.keyring.seal_for(tx, patient, text.encode(), _context(row))


async def _open(services: Services, tenant, sealed: bytes, row: str = "1") -> str:
    async with services.db.transaction(tenant.id) as tx:
        return (await services.keyring.open(tx, sealed, _context(row))).decode()


async def test_a_patient_key_is_made_on_first_use_and_stored_only_wrapped(services: Services, database) -> None:
    tenant = await _tenant(services)
    secret = canary("body")
    first = await _seal(services, tenant, "Patient/1", secret)
    second = await _seal(services, tenant, "Patient/1", secret, row="2")

    assert secret.encode() not in first
    assert await _open(services, tenant, first) == secret
    assert await _open(services, tenant, second, row="2") == secret
    owner = await asyncpg.connect(database.owner)
    try:
        assert await owner.fetchval("SELECT count(*) FROM data_keys") == 1
        wraps = await owner.fetch("SELECT kek_id, kek_version, length(wrapped) AS n FROM data_key_wraps")
        assert [(w["kek_version"], w["n"]) for w in wraps] == [(1, 60)]  # nonce + 32-byte key + tag
    finally:
        await owner.close()


async def test_concurrent_first_uses_make_one_key(services: Services, database) -> None:
    tenant = await _tenant(services)
    sealed = await asyncio.gather(*(_seal(services, tenant, "Patient/7", f"m{i}", row=str(i)) for i in range(10)))
    assert [await _open(services, tenant, s, row=str(i)) for i, s in enumerate(sealed)] == [f"m{i}" for i in range(10)]
    async with services.db.transaction(tenant.id) as tx:
        assert await tx.conn.fetchval("SELECT count(*) FROM data_keys") == 1


async def test_a_record_does_not_open_in_another_row_or_tenant(services: Services) -> None:
    acme, globex = await _tenant(services, "acme"), await _tenant(services, "globex")
    sealed = await _seal(services, acme, "Patient/1", "hello", row="1")
    with pytest.raises(DecryptionError):
        await _open(services, acme, sealed, row="2")
    with pytest.raises(DecryptionError):  # the key is not even visible from another tenant
        await _open(services, globex, sealed, row="1")


async def test_shredding_destroys_one_patients_content_and_leaves_the_rest(services: Services, database) -> None:
    tenant = await _tenant(services)
    gone = await _seal(services, tenant, "Patient/1", "to be forgotten")
    kept = await _seal(services, tenant, "Patient/2", "to be kept")

    result = await services.keys.shred("acme", "Patient/1", confirm="Patient/1", actor="Practitioner/admin")

    with pytest.raises(ShreddedError) as raised:
        await _open(services, tenant, gone)
    assert raised.value.shredded_at == result.shredded_at
    assert await _open(services, tenant, kept) == "to be kept"
    with pytest.raises(ShreddedError):  # no new content under a destroyed key either
        await _seal(services, tenant, "Patient/1", "more")
    owner = await asyncpg.connect(database.owner)
    try:
        rows = await owner.fetch("SELECT patient, shredded_at IS NOT NULL AS shredded FROM data_keys ORDER BY patient")
        assert [(r["patient"], r["shredded"]) for r in rows] == [("Patient/1", True), ("Patient/2", False)]
        assert await owner.fetchval("SELECT count(*) FROM data_key_wraps WHERE dek_id = $1", result.dek_id) == 0
    finally:
        await owner.close()


async def test_a_key_shredded_by_another_process_is_refused_despite_this_ones_cache(
    services: Services, kek_file: Path
) -> None:
    tenant = await _tenant(services)
    sealed = await _seal(services, tenant, "Patient/1", "cached")
    assert await _open(services, tenant, sealed) == "cached"  # now in this keyring's cache

    kek, _, other_process = build_key_services(services.db, kek_file)
    try:
        await other_process.shred("acme", "Patient/1", confirm="Patient/1", actor="cli")
    finally:
        kek.close()
    with pytest.raises(ShreddedError):
        await _open(services, tenant, sealed)


async def test_shredding_is_final_and_needs_confirmation(services: Services, database) -> None:
    tenant = await _tenant(services)
    await _seal(services, tenant, "Patient/1", "x")
    with pytest.raises(InvalidRequestError):
        await services.keys.shred("acme", "Patient/1", confirm="Patient/2", actor="cli")
    with pytest.raises(NotFoundError):
        await services.keys.shred("acme", "Patient/404", confirm="Patient/404", actor="cli")
    result = await services.keys.shred("acme", "Patient/1", confirm="Patient/1", actor="cli")
    with pytest.raises(ConflictError):
        await services.keys.shred("acme", "Patient/1", confirm="Patient/1", actor="cli")

    # Not even the application role can put a wrap back or clear the stamp.
    app = await asyncpg.connect(database.app)
    try:
        async with app.transaction():
            await app.execute("SELECT set_config('bedside.tenant_id', $1, true)", str(tenant.id))
            with pytest.raises(asyncpg.exceptions.CheckViolationError):
                await app.execute(
                    "INSERT INTO data_key_wraps (tenant_id, dek_id, kek_id, kek_version, wrapped) "
                    "VALUES ($1, $2, 'file:x', 1, '\\x00')",
                    tenant.id,
                    result.dek_id,
                )
        async with app.transaction():
            await app.execute("SELECT set_config('bedside.tenant_id', $1, true)", str(tenant.id))
            with pytest.raises(asyncpg.exceptions.CheckViolationError):
                await app.execute("UPDATE data_keys SET shredded_at = NULL WHERE id = $1", result.dek_id)
    finally:
        await app.close()


async def test_rotation_rewraps_every_key_and_old_content_stays_readable(services: Services, kek_file: Path) -> None:
    acme, globex = await _tenant(services, "acme"), await _tenant(services, "globex")
    sealed = {}
    for tenant in (acme, globex):
        for n in range(5):
            sealed[(tenant.slug, n)] = await _seal(services, tenant, f"Patient/{n}", f"{tenant.slug}-{n}")

    new_version = await services.keys.add_kek_version()
    assert new_version == 2
    assert (await services.keys.status()).stale_wraps == 10
    seen: list[tuple[int, int]] = []
    moved = await services.keys.rewrap(progress=lambda done, total: seen.append((done, total)))

    assert moved == 10
    assert seen[0] == (0, 10)
    assert seen[-1] == (10, 10)
    status = await services.keys.status()
    assert [(v.kek_version, v.wraps) for v in status.wraps] == [(2, 10)]
    assert await services.keys.rewrap() == 0  # idempotent

    # A fresh keyring (nothing cached) opens everything through the new wraps, even after retiring v1.
    await services.keys.retire(1)
    kek, fresh, _ = build_key_services(services.db, kek_file)
    try:
        for (slug, n), record in sealed.items():
            tenant = acme if slug == "acme" else globex
            async with services.db.transaction(tenant.id) as tx:
                assert (await fresh.open(tx, record, _context("1"))).decode() == f"{slug}-{n}"
    finally:
        kek.close()


async def test_retiring_a_version_still_in_use_or_the_primary_is_refused(services: Services) -> None:
    tenant = await _tenant(services)
    await _seal(services, tenant, "Patient/1", "x")
    await services.keys.add_kek_version()
    with pytest.raises(ConflictError, match="still use"):
        await services.keys.retire(1)
    with pytest.raises(ConflictError, match="primary"):
        await services.keys.retire(2)


class FailingAfter:
    """Fault injection around the real KEK provider: the process 'crashes' after n wraps."""

    def __init__(self, provider, n: int) -> None:
        self._provider = provider
        self._left = n

    def __getattr__(self, name: str):
        return getattr(self._provider, name)

    def wrap(self, secret: bytes, aad: bytes):
        if self._left == 0:
            raise RuntimeError("simulated crash")
        self._left -= 1
        return self._provider.wrap(secret, aad)


async def test_an_interrupted_rewrap_resumes_and_nothing_is_unreadable_meanwhile(
    services: Services, kek_file: Path
) -> None:
    tenant = await _tenant(services)
    records = [await _seal(services, tenant, f"Patient/{n}", f"body-{n}") for n in range(300)]
    await services.keys.add_kek_version()

    real = services.kek.provider
    services.kek.provider = FailingAfter(real, 260)  # the first batch of 256 commits, the second dies
    with pytest.raises(RuntimeError, match="simulated crash"):
        await services.keys.rewrap()
    services.kek.provider = real
    status = await services.keys.status()
    assert {(v.kek_version, v.wraps) for v in status.wraps} == {(1, 44), (2, 256)}

    kek, fresh, _ = build_key_services(services.db, kek_file)  # mid-rotation: both versions readable
    try:
        for n, record in enumerate(records):
            async with services.db.transaction(tenant.id) as tx:
                assert (await fresh.open(tx, record, _context("1"))).decode() == f"body-{n}"
    finally:
        kek.close()
    assert await services.keys.rewrap() == 44
    assert (await services.keys.status()).stale_wraps == 0


async def test_rotation_while_content_is_written_and_read(services: Services, kek_file: Path) -> None:
    tenant = await _tenant(services)
    for n in range(200):
        await _seal(services, tenant, f"Patient/{n}", "warm-up")
    await services.keys.add_kek_version()
    errors: list[BaseException] = []
    stop = asyncio.Event()

    async def writer_reader(worker: int) -> int:
        done = 0
        while not stop.is_set():
            patient = f"Patient/{(worker * 37 + done) % 250}"  # old keys and new ones alike
            text = canary(f"w{worker}")
            try:
                # A fresh keyring each time: nothing from a cache hides an unreadable wrap.
                kek, keyring, _ = build_key_services(services.db, kek_file)
                try:
                    async with services.db.transaction(tenant.id) as tx:
                        sealed = await keyring.seal_for(tx, patient, text.encode(), _context(str(done)))
                    async with services.db.transaction(tenant.id) as tx:
                        assert (await keyring.open(tx, sealed, _context(str(done)))).decode() == text
                finally:
                    kek.close()
            except BaseException as exc:  # collected and re-raised below
                errors.append(exc)
                raise
            done += 1
        return done

    workers = [asyncio.create_task(writer_reader(w)) for w in range(4)]
    moved = await services.keys.rewrap()
    await asyncio.sleep(0.1)
    stop.set()
    completed = await asyncio.gather(*workers)
    assert not errors
    assert moved >= 200
    assert sum(completed) > 0
    assert (await services.keys.rewrap()) + moved >= 200
    assert (await services.keys.status()).stale_wraps == 0


async def test_open_many_opens_records_of_several_keys_and_refuses_a_shredded_one(services: Services) -> None:
    tenant = await _tenant(services)
    sealed = [
        (await _seal(services, tenant, f"Patient/{n % 2}", f"text {n}", row=str(n)), _context(str(n))) for n in range(6)
    ]
    async with services.db.transaction(tenant.id) as tx:
        known = await DataKeyStore().for_patient(tx, tenant.id, "Patient/0")
        assert await services.keyring.open_many(tx, sealed, known) == [f"text {n}".encode() for n in range(6)]
        assert await services.keyring.open_many(tx, sealed) == [f"text {n}".encode() for n in range(6)]

    await services.keys.shred("acme", "Patient/1", confirm="Patient/1", actor="cli")
    async with services.db.transaction(tenant.id) as tx:
        known = await DataKeyStore().for_patient(tx, tenant.id, "Patient/0")
        assert await services.keyring.open_many(tx, sealed[0::2], known) == [b"text 0", b"text 2", b"text 4"]
        with pytest.raises(ShreddedError):
            await services.keyring.open_many(tx, sealed, known)
        stale = await DataKeyStore().for_patient(tx, tenant.id, "Patient/1")  # a known row that is shredded
        with pytest.raises(ShreddedError):
            await services.keyring.open_many(tx, sealed[1::2], stale)
