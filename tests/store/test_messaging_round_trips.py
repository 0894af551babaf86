"""The messaging hot paths counted in round trips to PostgreSQL: a deterministic measure of their cost
(timings on a shared machine are not), and a guard against a change that quietly adds one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from uuid import UUID

from asyncpg.connection import LoggedQuery

from service.domain.attachments import AttachmentReferences
from service.domain.audit import AuditRecorder
from service.domain.consents import ConsentLedger, ConsentRequest, Evidence, EvidenceMethod, Scope
from service.domain.idempotency import RequestFingerprints
from service.domain.messaging import MessagingService
from service.domain.principal import Principal, Role
from service.domain.tenants import TenantService
from service.store.attachments import AttachmentStore
from service.store.audit import AuditStore
from service.store.consents import ConsentStore
from service.store.db import Database, Tx
from service.store.idempotency import IdempotencyStore
from service.store.messaging import MessagingStore
from service.store.tenants import TenantStore
from tests.conftest import Dsns, build_key_services


class CountingDatabase(Database):
    """The application's Database, noting every statement its transactions send: BEGIN with the tenant
    (one simple-protocol batch), each query, and COMMIT."""

    statements: list[str]

    @contextlib.asynccontextmanager
    async def transaction(self, tenant_id: UUID | None = None) -> AsyncIterator[Tx]:
        self.statements.append("BEGIN")

        def note(query: LoggedQuery) -> None:
            self.statements.append(query.query)

        async with super().transaction(tenant_id) as tx:
            with tx.conn.query_logger(note):
                yield tx
            await asyncio.sleep(0)  # query loggers are called soon, not at once
        self.statements.append("COMMIT")


async def _messaging(database: Dsns, kek_file: Path) -> tuple[CountingDatabase, MessagingService, Principal, UUID]:
    """The messaging service as create_app wires it, on one connection, with a patient's thread."""
    db = await CountingDatabase.connect(database.app, min_size=1, max_size=1)
    db.statements = []
    recorder = AuditRecorder(AuditStore(), db)
    _, keyring, _ = build_key_services(db, kek_file)
    fingerprints = RequestFingerprints(keyring)
    consents = ConsentLedger(db, ConsentStore(), IdempotencyStore(), recorder, fingerprints=fingerprints)
    messaging = MessagingService(
        db,
        MessagingStore(),
        consents,
        keyring,
        IdempotencyStore(),
        recorder,
        attachments=AttachmentReferences(AttachmentStore()),
        fingerprints=fingerprints,
    )
    tenant = await TenantService(db, TenantStore(), recorder).create("acme")
    patient = Principal(tenant.id, "acme", "Patient/1", Role.PATIENT, "https://portal.acme.test")
    await consents.grant(
        patient,
        ConsentRequest("Patient/1", "Practitioner/7", Scope.MESSAGING, Evidence(EvidenceMethod.PORTAL, "v3")),
    )
    thread, _ = await messaging.create_thread(
        patient,
        patient="Patient/1",
        participants=["Practitioner/7"],
        subject="Round trips",
        priority="routine",
        sensitive=False,
        first_message="first",
    )
    return db, messaging, patient, thread.record.id


async def _counted(db: CountingDatabase, work: Awaitable[object]) -> list[str]:
    db.statements = []
    await work
    return list(db.statements)


async def test_a_send_and_a_read_are_four_round_trips_each(database: Dsns, kek_file: Path) -> None:
    db, messaging, patient, thread_id = await _messaging(database, kek_file)
    physician = Principal(patient.tenant_id, "acme", "Practitioner/7", Role.PHYSICIAN, "https://portal.acme.test")
    try:
        for who in (patient, physician):  # the first of each prepares its statements
            await messaging.send(who, thread_id, "warm-up")
            # (and the first keyed one reads the tenant's key, which fingerprints are keyed with)
            await messaging.send(who, thread_id, "warm-up", idempotency_key=f"warm-{who.subject}")
            await messaging.messages(who, thread_id, after=None, before=None, limit=50)

            # BEGIN with the tenant; the thread, the caller's teams, consents and key; the write; COMMIT.
            assert len(await _counted(db, messaging.send(who, thread_id, "hello"))) == 4
            # The idempotency key is claimed with the reads, its response (the message's id) with it: the
            # key's row is written once, never updated.
            keyed = await _counted(db, messaging.send(who, thread_id, "once", idempotency_key=f"k-{who.subject}"))
            assert len(keyed) == 4
            assert not any("UPDATE idempotency_keys" in s for s in keyed), keyed
            # A replay: BEGIN; the claim finds the key taken; what the first request stored; the message,
            # its thread (access) and the patient's key; its read event; COMMIT. The key is claimed once.
            replay = messaging.send(who, thread_id, "once", idempotency_key=f"k-{who.subject}")
            statements = await _counted(db, replay)
            assert sum("INSERT INTO idempotency_keys" in s for s in statements) == 1, statements
            assert len(statements) == 8, statements
            # BEGIN; the thread, teams, key and the page; the audit event; COMMIT.
            page = messaging.messages(who, thread_id, after=None, before=None, limit=50)
            assert len(await _counted(db, page)) == 4
            later = messaging.messages(who, thread_id, after=1, before=None, limit=2)
            assert len(await _counted(db, later)) == 4
            # A thread's view reads the caller's unread count and the receipts in one statement.
            view = await _counted(db, messaging.get_thread(who, thread_id))
            assert sum("read_receipts" in s for s in view) == 1, view
    finally:
        await db.close()
