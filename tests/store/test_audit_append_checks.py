"""The database checks the whole tree the sequencer hands it, not only the leaves.

`bedside_audit_append` is executable by the application role, so whoever holds that login can call it with
nodes, a root, a frontier and a note of their own. These tests do that, as the application role, starting
from what the real sequencer would send and changing one thing.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from uuid import UUID

import asyncpg
import pytest

from crypto.checkpoint import Ed25519CheckpointSigner, format_checkpoint, sign_note
from crypto.merkle import TreeFrontier, leaf_hash, node_hash
from service.domain.audit import AuditAction, AuditEvent, AuditRecorder
from service.domain.audit_log import AuditLog
from service.domain.audit_verify import verify_database
from service.store.audit import AuditStore
from service.store.db import Database
from tests.conftest import Dsns, Services

ORIGIN = "bedside.test/audit"
FORGED = hashlib.sha256(b"forged").digest()


@dataclass(frozen=True)
class Append:
    """The arguments of one call of bedside_audit_append."""

    expected_size: int
    ids: list[int]
    nodes: list[tuple[int, int, bytes]]
    frontier: bytes
    root: bytes
    note: str


@dataclass
class Setup:
    app: asyncpg.Connection
    owner_db: Database
    services: Services
    tenant: UUID
    signer: Ed25519CheckpointSigner
    log: AuditLog

    async def record(self, n: int) -> None:
        recorder = AuditRecorder(AuditStore(), self.services.db)
        async with self.services.db.transaction(self.tenant) as tx:
            for i in range(n):
                await recorder.record(
                    tx, AuditEvent.by_operator(AuditAction.KEY_STATUS, tenant_id=self.tenant, resource_id=f"r{i}")
                )

    async def sequence(self, batch: int = 256) -> int:
        """Run the real sequencer, as the application role, until the outbox is empty."""
        self.log.batch = batch
        total = 0
        async with self.services.db.session() as conn:
            while n := await self.log.integrate(conn):
                total += n
        return total

    def note(self, size: int, root: bytes) -> str:
        return sign_note(format_checkpoint(ORIGIN, size, root), self.signer)

    async def honest(self) -> Append:
        """What the sequencer would append for every row in the outbox now."""
        claimed = await self.app.fetch("SELECT id, entry FROM bedside_audit_claim(1000)")
        state = await AuditStore().state(self.app)
        frontier, nodes = TreeFrontier.from_bytes(state.frontier).extend_with_nodes(
            leaf_hash(bytes(r["entry"])) for r in claimed
        )
        return Append(
            state.size,
            [r["id"] for r in claimed],
            [(n.level, n.idx, n.hash) for n in nodes],
            frontier.to_bytes(),
            frontier.root(),
            self.note(frontier.size, frontier.root()),
        )

    async def append(self, a: Append) -> int:
        return await AuditStore().integrate(self.app, a.expected_size, a.ids, a.nodes, a.frontier, a.root, a.note)

    async def snapshot(self) -> tuple[object, ...]:
        return (
            tuple(await self.app.fetchrow("SELECT size, frontier, root, updated_at FROM audit_tree_state")),
            await self.app.fetchval("SELECT count(*) FROM audit_tree_nodes"),
            await self.app.fetchval("SELECT count(*) FROM audit_checkpoints"),
            await self.app.fetchval("SELECT pending FROM bedside_audit_backlog()"),
        )

    async def refused(self, a: Append, match: str) -> None:
        """The append is refused and leaves the log as it was."""
        before = await self.snapshot()
        with pytest.raises(asyncpg.exceptions.RaiseError, match=match):
            await self.append(a)
        assert await self.snapshot() == before

    async def verifies(self) -> None:
        result = await verify_database(
            self.owner_db, AuditStore(), vkey=self.signer.verifier_key().to_vkey(), origin=ORIGIN, trusted=[]
        )
        assert result.ok, result.problem


@pytest.fixture
async def setup(database: Dsns, services: Services) -> AsyncIterator[Setup]:
    tenant = (await services.tenants.ensure("acme")).id
    signer = Ed25519CheckpointSigner.generate(ORIGIN)
    app = await asyncpg.connect(database.app)
    owner_db = await Database.connect(database.owner, min_size=1, max_size=2)
    s = Setup(app, owner_db, services, tenant, signer, AuditLog(AuditStore(), signer, origin=ORIGIN))
    await s.sequence()  # whatever creating the tenant recorded
    try:
        yield s
    finally:
        await app.close()
        await owner_db.close()


async def _grow_to(s: Setup, size: int) -> None:
    size_now = (await AuditStore().state(s.app)).size
    await s.record(size - size_now)
    assert await s.sequence() == size - size_now


def _without(a: Append, level: int, idx: int) -> Append:
    return dataclasses.replace(a, nodes=[n for n in a.nodes if (n[0], n[1]) != (level, idx)])


def _replaced(a: Append, level: int, idx: int, value: bytes) -> Append:
    return dataclasses.replace(a, nodes=[(lv, i, value if (lv, i) == (level, idx) else h) for lv, i, h in a.nodes])


async def test_a_node_forged_at_a_future_position_is_refused_and_the_sequencer_goes_on(setup: Setup) -> None:
    await _grow_to(setup, 3)
    await setup.record(2)
    honest = await setup.honest()
    assert honest.expected_size == 3
    # (3, 0) covers leaves 0..7: the sequencer stores it when the log reaches 8 leaves. Stored now, every
    # append that reaches 8 would fail on the primary key, and the sequencer with it, for good.
    forged = dataclasses.replace(honest, nodes=[*honest.nodes, (3, 0, FORGED)])
    await setup.refused(forged, "not one that growing the tree from 3 to 5 completes")

    await setup.record(20)
    assert await setup.sequence(batch=7) == 22
    true_leaves = [
        bytes(r["hash"])
        for r in await setup.app.fetch("SELECT hash FROM audit_tree_nodes WHERE level = 0 AND idx < 8 ORDER BY idx")
    ]
    top = await setup.app.fetchval("SELECT hash FROM audit_tree_nodes WHERE level = 3 AND idx = 0")
    assert top == TreeFrontier.from_leaf_hashes(true_leaves).root()
    await setup.verifies()


@pytest.mark.parametrize(
    ("level", "idx", "why"),
    [
        (0, 9, "a leaf position beyond the new size"),
        (1, 2, "a pair the new size only half covers"),
        (2, 1, "a future subtree"),
        (1, 0, "a subtree stored by an earlier append"),
        (0, 1, "a leaf stored by an earlier append"),
        (63, 0, "a level no tree reaches"),
        (1, -1, "a negative index"),
    ],
)
async def test_a_node_this_append_does_not_complete_is_refused(setup: Setup, level: int, idx: int, why: str) -> None:
    await _grow_to(setup, 3)
    await setup.record(2)  # 3 -> 5 completes (0, 3), (0, 4), (1, 1) and (2, 0)
    honest = await setup.honest()
    assert sorted((n[0], n[1]) for n in honest.nodes) == [(0, 3), (0, 4), (1, 1), (2, 0)]
    await setup.refused(dataclasses.replace(honest, nodes=[*honest.nodes, (level, idx, FORGED)]), "is not one")
    assert await setup.append(honest) == 5


async def _eight_to_sixteen(setup: Setup) -> Append:
    """An append of 8 leaves to a log of 8: it completes 8 leaves, (1, 4..7), (2, 2), (2, 3), (3, 1) and
    the root (4, 0), whose left child (3, 0) an earlier append stored."""
    await _grow_to(setup, 8)
    await setup.record(8)
    honest = await setup.honest()
    assert (honest.expected_size, len(honest.nodes)) == (8, 16)
    return honest


@pytest.mark.parametrize(("level", "idx"), [(0, 13), (1, 6), (2, 2), (3, 1), (4, 0)])
async def test_a_missing_node_is_refused(setup: Setup, level: int, idx: int) -> None:
    honest = await _eight_to_sixteen(setup)
    await setup.refused(_without(honest, level, idx), "completes 16 nodes, 15 given")
    assert await setup.append(honest) == 16


@pytest.mark.parametrize(("level", "idx"), [(1, 4), (2, 3), (3, 1)])
async def test_an_interior_node_that_is_not_the_hash_of_its_children_is_refused(
    setup: Setup, level: int, idx: int
) -> None:
    honest = await _eight_to_sixteen(setup)
    # Below the root: a check of the root alone would not notice.
    await setup.refused(_replaced(honest, level, idx, FORGED), f"node [(]{level}, {idx}[)] is not the hash")
    assert await setup.append(honest) == 16


async def test_a_forged_root_node_with_a_matching_root_frontier_and_note_is_refused(setup: Setup) -> None:
    honest = await _eight_to_sixteen(setup)
    forged = dataclasses.replace(
        _replaced(honest, 4, 0, FORGED),
        root=FORGED,
        frontier=TreeFrontier(16, (FORGED,)).to_bytes(),
        note=setup.note(16, FORGED),
    )
    await setup.refused(forged, "node [(]4, 0[)] is not the hash of its children")
    assert await setup.append(honest) == 16


async def test_a_root_that_is_not_the_root_of_the_leaves_is_refused(setup: Setup) -> None:
    await _grow_to(setup, 5)
    await setup.record(2)  # 5 -> 7: the root folds (2, 0), (1, 2) and (0, 6)
    honest = await setup.honest()
    # Everything else names the forged root, as a forger would; only the root check can tell.
    wrong = node_hash(honest.root, honest.root)
    await setup.refused(dataclasses.replace(honest, root=wrong, note=setup.note(7, wrong)), "the root is not")
    assert await setup.append(honest) == 7


async def test_a_frontier_that_is_not_the_frontier_of_the_leaves_is_refused(setup: Setup) -> None:
    await _grow_to(setup, 5)
    await setup.record(2)
    honest = await setup.honest()
    frontier = TreeFrontier.from_bytes(honest.frontier)
    for wrong in (
        TreeFrontier(7, (*frontier.nodes[:-1], FORGED)).to_bytes(),
        TreeFrontier(7, frontier.nodes[::-1]).to_bytes(),
        TreeFrontier(11, (*frontier.nodes[:2], FORGED)).to_bytes(),
        honest.frontier + FORGED,
        b"\x02" + honest.frontier[1:],
    ):
        await setup.refused(dataclasses.replace(honest, frontier=wrong), "the frontier is not")
    assert await setup.append(honest) == 7


async def test_a_note_that_names_another_size_or_root_is_refused(setup: Setup) -> None:
    await _grow_to(setup, 5)
    await setup.record(2)
    honest = await setup.honest()
    for wrong in (setup.note(8, honest.root), setup.note(7, FORGED), setup.note(5, honest.root), "note"):
        await setup.refused(dataclasses.replace(honest, note=wrong), "the checkpoint note does not name")
    assert await setup.append(honest) == 7


async def test_batches_of_odd_sizes_append_and_verify(setup: Setup) -> None:
    sizes = [1, 3, 7, 256, 5, 2, 255, 1, 256]
    for size in sizes:
        await setup.record(size)
        setup.log.batch = size
        async with setup.services.db.session() as conn:
            assert await setup.log.integrate(conn) == size
    total = (await AuditStore().state(setup.app)).size
    nodes = await setup.app.fetchval("SELECT count(*) FROM audit_tree_nodes")
    assert nodes == sum(total >> level for level in range(64))  # every perfect subtree, stored once
    await setup.verifies()
