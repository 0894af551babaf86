"""`bedside audit verify`: recompute the Merkle log and check it against its signed checkpoints.

Online, it streams every leaf in order (one repeatable-read snapshot with the checkpoints) and checks:
dense sequence numbers; each stored leaf hash is SHA-256(0x00 || entry); the stored level-0 node agrees;
each entry decodes and agrees with the row's queryable columns; every checkpoint's signature, and that
its signed root equals the root recomputed over that many leaves; that no leaf lies beyond the last
checkpoint and no checkpoint beyond the last leaf. Consecutive checkpoints whose roots both equal the
recomputed prefixes of one sequence of leaves are consistent by construction. Checkpoints published
elsewhere (`--trusted-checkpoint`) are checked the same way: a log truncated and regrown, with its own
checkpoints rewritten too, still disagrees with what was published.

Offline, it checks an export file: the checkpoint's signature with the public key, each event's leaf
hash and fields against its entry, and each event's inclusion proof (or, for a complete export without
proofs, the root recomputed from every leaf).

The first bad index is named. Where only a checkpoint disagrees, the damage lies somewhere among the
leaves it covers beyond the previous good checkpoint, and the first of those is named.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from uuid import UUID

from crypto.checkpoint import CheckpointError, verify_checkpoint
from crypto.merkle import EncodingError, TreeFrontier, leaf_hash, verify_inclusion
from service.domain.audit import (
    OPTIONAL_FIELDS,
    decode_entry,
    format_time,
    key_id_of,
    optional_fields,
    token_id_of,
)
from service.store.audit import AuditStore, CheckpointRecord, LeafRecord, OutboxRow
from service.store.db import Database

Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class VerifyResult:
    leaves: int
    checkpoints: int
    first_bad_index: int | None = None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


class _BadLogError(Exception):
    def __init__(self, index: int, problem: str) -> None:
        super().__init__(problem)
        self.index = index
        self.problem = problem


def _fields_match(event: OutboxRow, entry: bytes) -> bool:
    try:
        fields = decode_entry(entry)
    except (ValueError, EncodingError):
        return False
    expected = {
        "event_id": str(event.event_id),
        "occurred_at": format_time(event.occurred_at),
        "tenant_id": None if event.tenant_id is None else str(event.tenant_id),
        "action": event.action,
        "outcome": event.outcome,
        **optional_fields(event),
    }
    if any(fields.get(name) != value for name, value in expected.items()):
        return False
    # Absent (no token, no verifying key, or an older entry) or text.
    if not all(isinstance(fields.get(name, ""), str) for name in ("token_id", "key_id")):
        return False
    stored = fields.get("details")
    return isinstance(stored, str) and json.loads(stored) == json.loads(event.details)


def signed_roots(
    checkpoints: Sequence[CheckpointRecord], trusted: Iterable[str], vkey: str, origin: str
) -> dict[int, bytes]:
    """size -> root from every checkpoint whose signature verifies; a bad one fails at the first index
    it covers beyond the previous checkpoint."""
    roots: dict[int, bytes] = {}
    previous = 0
    for record in sorted(checkpoints, key=lambda c: c.size):
        try:
            checkpoint = verify_checkpoint(record.note, vkey, origin=origin)
        except CheckpointError:
            raise _BadLogError(
                previous, f"the checkpoint of size {record.size} is not signed by the log's key"
            ) from None
        if checkpoint.size != record.size or checkpoint.root_hash != record.root:
            raise _BadLogError(previous, f"the checkpoint row of size {record.size} differs from its signed note")
        roots[record.size] = checkpoint.root_hash
        previous = record.size
    for note in trusted:
        try:
            checkpoint = verify_checkpoint(note, vkey, origin=origin)
        except CheckpointError:
            raise _BadLogError(0, "a trusted checkpoint given on the command line does not verify") from None
        known = roots.get(checkpoint.size)
        if known is not None and known != checkpoint.root_hash:
            raise _BadLogError(0, f"two different signed histories at size {checkpoint.size}")
        roots[checkpoint.size] = checkpoint.root_hash
    return roots


async def verify_log(
    leaves: AsyncIterator[tuple[LeafRecord, bytes | None]],
    checkpoints: Sequence[CheckpointRecord],
    *,
    vkey: str,
    origin: str,
    trusted: Iterable[str] = (),
    total: int = 0,
    progress: Progress | None = None,
) -> VerifyResult:
    """Verify the whole log (see the module docstring)."""
    count = 0
    try:
        roots = signed_roots(checkpoints, trusted, vkey, origin)
        sizes = sorted(roots)
        frontier, pending, good, next_at = TreeFrontier.empty(), [], 0, 0
        async for leaf, node in leaves:
            if leaf.seq != count:
                what = "missing" if leaf.seq > count else "duplicated or out of order"
                raise _BadLogError(count, f"leaf {count} is {what}")
            computed = leaf_hash(leaf.event.entry)
            if leaf.leaf_hash != computed:
                raise _BadLogError(count, f"leaf {count}: its entry does not hash to its stored leaf hash")
            if node != computed:
                raise _BadLogError(count, f"leaf {count}: the tree's stored node differs from the leaf")
            if not _fields_match(leaf.event, leaf.event.entry):
                raise _BadLogError(count, f"leaf {count}: its columns differ from its signed entry")
            pending.append(computed)
            count += 1
            while next_at < len(sizes) and sizes[next_at] == count:
                frontier = frontier.extend(pending)
                pending = []
                if frontier.root() != roots[count]:
                    raise _BadLogError(
                        good, f"leaves [{good}, {count}) do not match the signed checkpoint of size {count}"
                    )
                good = count
                next_at += 1
            if progress and count % 1000 == 0:
                progress(count, total)
        if next_at < len(sizes):
            raise _BadLogError(count, f"the log has {count} leaves but a checkpoint was signed for {sizes[next_at]}")
        if count > good:
            raise _BadLogError(good, f"leaves from {good} to {count - 1} are not covered by any signed checkpoint")
    except _BadLogError as failure:
        return VerifyResult(count, len(checkpoints), failure.index, failure.problem)
    if progress:
        progress(count, total)
    return VerifyResult(count, len(checkpoints))


# -- export files ---------------------------------------------------------------------------------


async def verify_database(
    db: Database,
    store: AuditStore,
    *,
    vkey: str,
    origin: str,
    trusted: Iterable[str] = (),
    progress: Progress | None = None,
) -> VerifyResult:
    """Verify the log in the database, in one consistent snapshot. `db` must read every tenant's
    leaves: the owner role (row-level security hides the rest from the application role)."""
    async with db.session() as conn, store.snapshot(conn):
        checkpoints = await store.all_checkpoints(conn)
        total = (await store.state(conn)).size
        return await verify_log(
            store.all_leaves(conn),
            checkpoints,
            vkey=vkey,
            origin=origin,
            trusted=trusted,
            total=total,
            progress=progress,
        )


def export_header(checkpoint: CheckpointRecord, vkey: str) -> dict[str, object]:
    return {
        "type": "checkpoint",
        "size": checkpoint.size,
        "root": checkpoint.root.hex(),
        "note": checkpoint.note,
        "vkey": vkey,
    }


def export_event(leaf: LeafRecord, proof: Sequence[bytes] | None) -> dict[str, object]:
    event = leaf.event
    line: dict[str, object] = {
        "type": "event",
        "seq": leaf.seq,
        "leaf_hash": leaf.leaf_hash.hex(),
        "entry": base64.b64encode(event.entry).decode(),
        "event_id": str(event.event_id),
        "occurred_at": format_time(event.occurred_at),
        "tenant_id": None if event.tenant_id is None else str(event.tenant_id),
        "action": event.action,
        "outcome": event.outcome,
        **optional_fields(event),
        "token_id": token_id_of(event.entry),
        "key_id": key_id_of(event.entry),
        "details": json.loads(event.details),
    }
    if proof is not None:
        line["proof"] = [p.hex() for p in proof]
    return line


def _row_from_line(line: dict[str, object], entry: bytes) -> OutboxRow:
    occurred = datetime.strptime(str(line["occurred_at"]), "%Y-%m-%dT%H:%M:%S.%fZ")
    tenant = line.get("tenant_id")

    def text(name: str) -> str | None:
        value = line.get(name)
        return None if value is None else str(value)

    return OutboxRow(
        event_id=UUID(str(line["event_id"])),
        occurred_at=occurred.replace(tzinfo=UTC),
        tenant_id=None if tenant is None else UUID(str(tenant)),
        action=str(line["action"]),
        outcome=str(line["outcome"]),
        **{name: text(name) for name in OPTIONAL_FIELDS},
        details=json.dumps(line.get("details", {})),
        entry=entry,
    )


def verify_export(lines: Iterable[str], *, vkey: str, origin: str) -> VerifyResult:
    """Verify an export file (NDJSON: a checkpoint line, then event lines) with the public key alone."""
    count, seen = 0, 0
    try:
        iterator = iter(lines)
        try:
            header = json.loads(next(iterator))
        except (StopIteration, json.JSONDecodeError):
            raise _BadLogError(0, "the file does not start with a checkpoint line") from None
        if not isinstance(header, dict) or header.get("type") != "checkpoint":
            raise _BadLogError(0, "the file does not start with a checkpoint line")
        try:
            checkpoint = verify_checkpoint(str(header.get("note")), vkey, origin=origin)
        except CheckpointError:
            raise _BadLogError(0, "the export's checkpoint is not signed by this key") from None
        size, root = checkpoint.size, checkpoint.root_hash
        dense: list[bytes] = []
        for raw in iterator:
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
                seq = int(line["seq"])
                stored = bytes.fromhex(line["leaf_hash"])
                entry = base64.b64decode(line["entry"], validate=True)
            except (ValueError, KeyError, TypeError):
                raise _BadLogError(seen, f"line {count + 2} is not an event line") from None
            seen = seq
            if leaf_hash(entry) != stored:
                raise _BadLogError(seq, f"leaf {seq}: its entry does not hash to its leaf hash")
            try:
                row = _row_from_line(line, entry)
            except (ValueError, KeyError, TypeError):
                raise _BadLogError(seq, f"leaf {seq}: its fields are malformed") from None
            # The token and key ids have no column of their own: the line's copies must be the signed ones
            # (an export from before they existed has none, and neither has its entry).
            signed = (token_id_of(entry), key_id_of(entry))
            if not _fields_match(row, entry) or (line.get("token_id"), line.get("key_id")) != signed:
                raise _BadLogError(seq, f"leaf {seq}: its fields differ from its signed entry")
            if "proof" in line:
                try:
                    path = [bytes.fromhex(p) for p in line["proof"]]
                except (ValueError, TypeError):
                    raise _BadLogError(seq, f"leaf {seq}: malformed inclusion proof") from None
                if not verify_inclusion(seq, size, stored, path, root):
                    raise _BadLogError(seq, f"leaf {seq}: not included in the signed tree of size {size}")
            else:
                if seq != len(dense):
                    raise _BadLogError(len(dense), f"leaf {len(dense)} is missing from a complete export")
                dense.append(stored)
            count += 1
        if dense:
            if len(dense) != size:
                raise _BadLogError(len(dense), f"the export holds {len(dense)} of the {size} signed leaves")
            if TreeFrontier.from_leaf_hashes(dense).root() != root:
                raise _BadLogError(0, "the export's leaves do not match the signed root")
    except _BadLogError as failure:
        return VerifyResult(count, 1, failure.index, failure.problem)
    return VerifyResult(count, 1)
