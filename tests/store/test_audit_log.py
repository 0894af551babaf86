"""The audit log: recorded with the work or not at all, integrated densely, and tamper-evident."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from crypto.checkpoint import Ed25519CheckpointSigner, format_checkpoint, sign_note
from crypto.merkle import TreeFrontier, leaf_hash
from service.domain.audit import AuditAction, AuditEvent, AuditRecorder
from service.domain.audit_log import AuditLog
from service.domain.audit_verify import VerifyResult, verify_database
from service.domain.principal import Principal, Role
from service.errors import AuditUnavailableError
from service.store.audit import AuditStore
from service.store.db import Database
from tests.conftest import Dsns, Services

ORIGIN = "bedside.test/audit"


@dataclass
class Log:
    owner_db: Database
    log: AuditLog
    signer: Ed25519CheckpointSigner
    recorder: AuditRecorder

    async def integrate_all(self) -> int:
        total = 0
        async with self.owner_db.session() as conn:
            while n := await self.log.integrate(conn):
                total += n
        return total

    async def verify(self, trusted: list[str] | None = None) -> VerifyResult:
        return await verify_database(
            self.owner_db,
            AuditStore(),
            vkey=self.signer.verifier_key().to_vkey(),
            origin=ORIGIN,
            trusted=trusted or [],
        )


@pytest.fixture
async def audit(database: Dsns, services: Services) -> AsyncIterator[Log]:
    owner_db = await Database.connect(database.owner, min_size=1, max_size=2)
    signer = Ed25519CheckpointSigner.generate(ORIGIN)
    # The sequencer runs as the application role in the service; here on its own connection.
    yield Log(
        owner_db,
        AuditLog(AuditStore(), signer, origin=ORIGIN, batch=16),
        signer,
        AuditRecorder(AuditStore(), services.db),
    )
    await owner_db.close()


async def _events(log: Log, services: Services, n: int) -> None:
    tenant = await services.tenants.ensure("acme")
    for i in range(n):
        await log.recorder.record_alone(
            AuditEvent.by_operator(AuditAction.KEY_STATUS, tenant_id=tenant.id, resource_id=f"r{i}")
        )


async def _owner(database: Dsns) -> asyncpg.Connection:
    """A rogue DBA: the owner (a superuser in the test cluster) with the append-only triggers off."""
    conn = await asyncpg.connect(database.owner)
    for table in ("audit_leaves", "audit_tree_nodes", "audit_checkpoints"):
        await conn.execute(f"ALTER TABLE {table} DISABLE TRIGGER ALL")
    return conn


async def test_an_untampered_log_verifies(audit: Log, services: Services) -> None:
    await _events(audit, services, 40)
    assert await audit.integrate_all() == 40 + 1  # and the tenant's creation
    result = await audit.verify()
    assert result.ok, result.problem
    assert result.leaves == 41
    assert result.checkpoints == 3  # batches of 16, 16, 9


async def test_a_log_of_entries_with_and_without_token_ids_verifies(audit: Log, services: Services) -> None:
    # Events without a token id are encoded as every event was before token ids were recorded: a log that
    # goes on from such leaves to ones with token ids verifies throughout.
    await _events(audit, services, 5)
    tenant = await services.tenants.ensure("acme")
    principal = Principal(tenant.id, "acme", "Patient/1", Role.PATIENT, "https://portal.acme.test", token_id="jti-1")
    for _ in range(5):
        await audit.recorder.record_alone(AuditEvent.by(principal, AuditAction.CONSENT_READ))
    assert await audit.integrate_all() == 5 + 5 + 1
    result = await audit.verify()
    assert result.ok, result.problem
    assert result.leaves == 11


async def test_a_log_that_goes_on_to_entries_with_key_ids_verifies_and_a_changed_key_id_does_not(
    audit: Log, services: Services, database: Dsns
) -> None:
    # Leaves of every earlier form (no token, a token id alone), then leaves naming the verifying key.
    await _events(audit, services, 3)
    tenant = await services.tenants.ensure("acme")
    portal = "https://portal.acme.test"
    for principal in (
        Principal(tenant.id, "acme", "Patient/1", Role.PATIENT, portal, token_id="jti-1"),
        Principal(tenant.id, "acme", "Patient/1", Role.PATIENT, portal, token_id="jti-2", key_id="portal-key-1"),
        Principal(tenant.id, "acme", "Patient/1", Role.PATIENT, portal, key_id="portal-key-2"),
    ):
        for _ in range(3):
            await audit.recorder.record_alone(AuditEvent.by(principal, AuditAction.CONSENT_READ))
    assert await audit.integrate_all() == 3 + 9 + 1
    result = await audit.verify()
    assert result.ok, result.problem
    assert result.leaves == 13

    # The key id is in the entry only, so it cannot be changed without changing the leaf: an entry
    # re-encoded with the portal's key instead of the one that verified the token fails at its index.
    owner = await _owner(database)
    try:
        seq, entry = await owner.fetchrow("SELECT seq, entry FROM audit_leaves ORDER BY seq DESC LIMIT 1")
        forged = bytes(entry).replace(b"portal-key-2", b"portal-key-1")
        await owner.execute("UPDATE audit_leaves SET entry = $2 WHERE seq = $1", seq, forged)
    finally:
        await owner.close()
    result = await audit.verify()
    assert (result.ok, result.first_bad_index) == (False, seq)


async def test_work_without_its_audit_event_does_not_happen(database: Dsns, services: Services) -> None:
    tenant = await services.tenants.create("acme")
    async with services.db.transaction(tenant.id) as tx:
        sealed = await services.keyring.seal_for(tx, "Patient/1", b"keep me", {"column": "test.body"})
    owner = await asyncpg.connect(database.owner)
    try:
        await owner.execute("REVOKE INSERT ON audit_outbox FROM bedside_app")
        with pytest.raises(AuditUnavailableError):
            await services.keys.shred("acme", "Patient/1", confirm="Patient/1", actor="cli")
    finally:
        await owner.execute("GRANT INSERT ON audit_outbox TO bedside_app")
        await owner.close()
    async with services.db.transaction(tenant.id) as tx:  # the shred rolled back with its event
        assert await services.keyring.open(tx, sealed, {"column": "test.body"}) == b"keep me"


async def test_eight_concurrent_writers_get_dense_unique_sequence_numbers(
    audit: Log, services: Services, database: Dsns
) -> None:
    tenant = await services.tenants.ensure("acme")

    async def writer(w: int) -> None:
        for i in range(40):
            await audit.recorder.record_alone(
                AuditEvent.by_operator(AuditAction.KEY_STATUS, tenant_id=tenant.id, resource_id=f"w{w}-{i}")
            )

    async def sequencer(stop: asyncio.Event) -> None:
        async with audit.owner_db.session() as conn:
            while not stop.is_set():
                if not await audit.log.integrate(conn):
                    await asyncio.sleep(0.01)

    stop = asyncio.Event()
    running = asyncio.create_task(sequencer(stop))
    await asyncio.gather(*(writer(w) for w in range(8)))
    stop.set()
    await running
    await audit.integrate_all()

    owner = await asyncpg.connect(database.owner)
    try:
        seqs = [r["seq"] for r in await owner.fetch("SELECT seq FROM audit_leaves ORDER BY seq")]
        ids = {r["resource_id"] for r in await owner.fetch("SELECT resource_id FROM audit_leaves")}
        assert seqs == list(range(len(seqs)))
        assert {f"w{w}-{i}" for w in range(8) for i in range(40)} <= ids
        assert await owner.fetchval("SELECT count(*) FROM audit_outbox") == 0
    finally:
        await owner.close()
    assert (await audit.verify()).ok


async def _tampered(audit: Log, services: Services, database: Dsns, *statements: str) -> VerifyResult:
    await _events(audit, services, 40)
    await audit.integrate_all()
    assert (await audit.verify()).ok
    owner = await _owner(database)
    try:
        for statement in statements:
            await owner.execute(statement)
    finally:
        await owner.close()
    return await audit.verify()


async def test_a_changed_entry_is_found(audit: Log, services: Services, database: Dsns) -> None:
    result = await _tampered(
        audit, services, database, "UPDATE audit_leaves SET entry = entry || '\\x00'::bytea WHERE seq = 20"
    )
    assert (result.first_bad_index, result.ok) == (20, False)
    assert "hash" in (result.problem or "")


async def test_a_changed_entry_with_recomputed_hashes_is_still_found(
    audit: Log, services: Services, database: Dsns
) -> None:
    # A careful DBA recomputes the leaf hash and the level-0 node: only the signed checkpoint disagrees.
    result = await _tampered(
        audit,
        services,
        database,
        "UPDATE audit_leaves SET entry = entry || '\\x00'::bytea, "
        "leaf_hash = sha256('\\x00'::bytea || entry || '\\x00'::bytea) WHERE seq = 20",
        "UPDATE audit_tree_nodes n SET hash = l.leaf_hash FROM audit_leaves l WHERE n.level = 0 AND n.idx = l.seq",
    )
    assert not result.ok
    assert result.first_bad_index is not None
    assert result.first_bad_index <= 20 < result.first_bad_index + 16  # within the checkpoint's batch


async def test_a_changed_column_is_found(audit: Log, services: Services, database: Dsns) -> None:
    result = await _tampered(
        audit, services, database, "UPDATE audit_leaves SET actor = 'Practitioner/x' WHERE seq = 7"
    )
    assert (result.first_bad_index, result.ok) == (7, False)


async def test_changed_details_are_found(audit: Log, services: Services, database: Dsns) -> None:
    result = await _tampered(
        audit, services, database, """UPDATE audit_leaves SET details = '{"reason": "forged"}' WHERE seq = 7"""
    )
    assert (result.first_bad_index, result.ok) == (7, False)


async def test_a_deleted_leaf_is_found(audit: Log, services: Services, database: Dsns) -> None:
    result = await _tampered(audit, services, database, "DELETE FROM audit_leaves WHERE seq = 13")
    assert (result.first_bad_index, result.ok) == (13, False)


async def test_two_swapped_leaves_are_found(audit: Log, services: Services, database: Dsns) -> None:
    result = await _tampered(
        audit,
        services,
        database,
        "UPDATE audit_leaves SET seq = seq + 1000000 WHERE seq IN (3, 9)",
        "UPDATE audit_leaves SET seq = CASE seq WHEN 1000003 THEN 9 ELSE 3 END WHERE seq >= 1000000",
    )
    assert (result.first_bad_index, result.ok) == (3, False)


async def test_an_inserted_leaf_is_found(audit: Log, services: Services, database: Dsns) -> None:
    result = await _tampered(
        audit,
        services,
        database,
        "INSERT INTO audit_leaves SELECT seq + 1000, leaf_hash, integrated_at, gen_random_uuid(), occurred_at, "
        "tenant_id, action, outcome, actor, actor_role, issuer, act_for, patient, resource_type, resource_id, "
        "purpose, request_id, source, details, entry FROM audit_leaves WHERE seq = 5",
        "UPDATE audit_leaves SET seq = 41 WHERE seq = 1005",
        "INSERT INTO audit_tree_nodes SELECT 0, 41, leaf_hash FROM audit_leaves WHERE seq = 41",
    )
    assert (result.first_bad_index, result.ok) == (41, False)


async def test_a_deleted_tail_under_its_checkpoint_is_found(audit: Log, services: Services, database: Dsns) -> None:
    # The last events cut away, their checkpoint left: it was signed for more leaves than remain.
    result = await _tampered(audit, services, database, "DELETE FROM audit_leaves WHERE seq >= 36")
    assert (result.first_bad_index, result.ok) == (36, False)
    assert "a checkpoint was signed for 41" in (result.problem or "")


async def test_leaves_after_the_last_signed_checkpoint_are_found(
    audit: Log, services: Services, database: Dsns
) -> None:
    # The newest checkpoint removed: the leaves it covered are vouched for by no signature any more.
    result = await _tampered(audit, services, database, "DELETE FROM audit_checkpoints WHERE size = 41")
    assert (result.first_bad_index, result.ok) == (32, False)
    assert "not covered by any signed checkpoint" in (result.problem or "")


async def test_a_published_checkpoint_contradicting_a_stored_one_is_two_histories(
    audit: Log, services: Services
) -> None:
    # The log's own key signed another root for a size it also stored: a fork, told apart from tampered leaves.
    await _events(audit, services, 40)
    await audit.integrate_all()
    other = sign_note(format_checkpoint(ORIGIN, 32, leaf_hash(b"another history")), audit.signer)
    result = await audit.verify(trusted=[other])
    assert (result.first_bad_index, result.ok) == (0, False)
    assert "two different signed histories at size 32" in (result.problem or "")


async def test_a_truncated_and_regrown_log_is_found(audit: Log, services: Services, database: Dsns) -> None:
    await _events(audit, services, 40)
    await audit.integrate_all()
    async with audit.owner_db.session() as conn:
        published = (await AuditStore().all_checkpoints(conn))[-1].note  # `bedside audit checkpoint`
    owner = await _owner(database)
    try:  # cut back to 32 leaves, remove the later checkpoints and nodes, then let the log grow again
        await owner.execute("DELETE FROM audit_leaves WHERE seq >= 32")
        await owner.execute("DELETE FROM audit_tree_nodes WHERE (idx + 1) * (1::bigint << level) > 32")
        await owner.execute("DELETE FROM audit_checkpoints WHERE size > 32")
        frontier = await owner.fetchval("SELECT frontier FROM audit_tree_state")
        del frontier

        hashes = [
            bytes(r["hash"])
            for r in await owner.fetch("SELECT hash FROM audit_tree_nodes WHERE level = 0 ORDER BY idx")
        ]
        rebuilt = TreeFrontier.from_leaf_hashes(hashes)
        await owner.execute(
            "UPDATE audit_tree_state SET size = $1, frontier = $2, root = $3", 32, rebuilt.to_bytes(), rebuilt.root()
        )
    finally:
        await owner.close()
    await _events(audit, services, 12)  # new, different history after 32
    await audit.integrate_all()

    alone = await audit.verify()
    assert alone.ok, "the rewritten log is self-consistent: only a published checkpoint exposes it"
    result = await audit.verify(trusted=[published])
    assert not result.ok
    assert result.first_bad_index is not None
    assert result.first_bad_index <= 32


async def test_a_replaced_checkpoint_is_found(audit: Log, services: Services, database: Dsns) -> None:
    await _events(audit, services, 40)
    await audit.integrate_all()
    forger = Ed25519CheckpointSigner.generate(ORIGIN)  # same name, another key
    owner = await _owner(database)
    try:
        size, root = 32, await owner.fetchval("SELECT root FROM audit_checkpoints WHERE size = 32")
        forged = sign_note(format_checkpoint(ORIGIN, size, bytes(root)), forger)
        await owner.execute("UPDATE audit_checkpoints SET note = $1 WHERE size = 32", forged)
    finally:
        await owner.close()
    result = await audit.verify()
    assert not result.ok
    assert result.first_bad_index == 16
    assert "not signed by the log's key" in (result.problem or "")


async def test_a_checkpoint_row_that_differs_from_its_note_is_found(
    audit: Log, services: Services, database: Dsns
) -> None:
    result = await _tampered(
        audit, services, database, "UPDATE audit_checkpoints SET root = sha256('x'::bytea) WHERE size = 16"
    )
    assert (result.first_bad_index, result.ok) == (0, False)


@pytest.mark.parametrize("table", ["audit_leaves", "audit_tree_nodes", "audit_checkpoints"])
async def test_the_app_role_cannot_alter_the_log(database: Dsns, audit: Log, services: Services, table: str) -> None:
    await _events(audit, services, 3)
    await audit.integrate_all()
    conn = await asyncpg.connect(database.app)
    try:
        column = {"audit_tree_nodes": "hash", "audit_checkpoints": "root"}.get(table, "actor")
        for statement in (f"UPDATE {table} SET {column} = NULL", f"DELETE FROM {table}", f"TRUNCATE {table}"):  # noqa: S608
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
                await conn.execute(statement)
    finally:
        await conn.close()


async def test_the_triggers_refuse_even_the_owner_in_replica_mode(
    database: Dsns, audit: Log, services: Services
) -> None:
    await _events(audit, services, 3)
    await audit.integrate_all()
    owner = await asyncpg.connect(database.owner)
    try:
        await owner.execute("SET session_replication_role = replica")
        for statement in (
            "DELETE FROM audit_leaves",
            "TRUNCATE audit_checkpoints",
            "UPDATE audit_tree_nodes SET idx = idx",
        ):
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError, match="append-only"):
                await owner.execute(statement)
    finally:
        await owner.close()


async def test_leaf_hashes_are_checked_by_the_database_too(database: Dsns, audit: Log, services: Services) -> None:
    await _events(audit, services, 1)
    conn = await asyncpg.connect(database.app)
    try:
        claimed = await conn.fetch("SELECT id, entry FROM bedside_audit_claim(10)")
        assert claimed
        # A tree that is whole and consistent (every node the append completes, hashed from its children,
        # and its root and frontier), only over the wrong leaf hashes.
        frontier, nodes = TreeFrontier.empty().extend_with_nodes([leaf_hash(b"not the entry")] * len(claimed))
        with pytest.raises(asyncpg.exceptions.RaiseError, match="leaf hashes"):
            await conn.fetchval(
                "SELECT bedside_audit_append(0, $1, $2, $3, $4, $5, $6, $7)",
                [r["id"] for r in claimed],
                [n.level for n in nodes],
                [n.idx for n in nodes],
                [n.hash for n in nodes],
                frontier.to_bytes(),
                frontier.root(),
                format_checkpoint(ORIGIN, frontier.size, frontier.root()),
            )
    finally:
        await conn.close()


def test_the_signing_key_file_is_refused_when_readable_by_others(tmp_path: Path) -> None:
    path = tmp_path / "key"
    Ed25519CheckpointSigner.generate(ORIGIN).save(path)
    path.chmod(0o644)
    with pytest.raises(Exception, match=r"permission|mode|readable|group|other"):
        Ed25519CheckpointSigner.load(path)
