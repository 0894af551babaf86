"""Secure messaging: threads between a patient and practitioners or care teams, their messages, read
receipts, recall, break-glass reading, and the notification hook.

The path of one send: one transaction loads the thread (tenant-scoped), asks `policy`, asks the consent
ledger about every practitioner or care team of the thread, claims the idempotency key, seals the body
with the patient's data key (AAD binds tenant, column, message id, thread and sender), takes the next
sequence number under the thread's row lock, inserts the message, the webhook outbox rows and the audit
event, and commits. Nothing after the commit waits on the network.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID

from service.domain.audit import AuditAction, AuditEvent, AuditRecorder
from service.domain.consents import ConsentLedger, Decision, Scope
from service.domain.idempotency import RequestFingerprints, replayable
from service.domain.keyring import PatientKeyring
from service.domain.policy import (
    Access,
    Standing,
    ThreadFacts,
    can_break_glass,
    can_manage_care_teams,
    can_review_break_glass,
    can_start_thread,
    thread_access,
)
from service.domain.principal import Principal, Role, is_plain_text, is_reference
from service.errors import (
    AlreadyExistsError,
    ConflictError,
    ConsentRequiredError,
    FieldProblem,
    ForbiddenError,
    InvalidRequestError,
    NotFoundError,
    ShreddedError,
)
from service.store.data_keys import DataKeyRecord
from service.store.db import Database, Tx
from service.store.idempotency import IdempotencyClaim, IdempotencyStore, StoredResponse
from service.store.messaging import BreakGlassRecord, MessageRecord, MessagingStore, ReceiptRecord, ThreadRecord

if TYPE_CHECKING:  # domain/attachments imports this module; only the type is needed here
    from service.domain.attachments import AttachmentReferences

MAX_BODY_BYTES = 64 * 1024
MAX_SUBJECT_CHARS = 200
MAX_PAGE = 200
ETREAT = "ETREAT"


@dataclass(frozen=True, slots=True)
class ThreadView:
    record: ThreadRecord
    subject: str | None  # None in a listing's tombstone of a shredded patient's thread
    access: Access
    unread: int = 0  # the reader's: the others' messages after the reader's receipt
    receipts: tuple[ReceiptRecord, ...] | None = None  # None: not read for this answer (a listing's item)
    shredded_at: datetime | None = None
    replayed: bool = False  # a creation's stored answer, given again for its Idempotency-Key


@dataclass(frozen=True, slots=True)
class MessageView:
    record: MessageRecord
    body: str | None  # None once recalled: recipients see a tombstone
    replayed: bool = False

    @property
    def attachment_ids(self) -> tuple[UUID, ...]:
        """The attachments it carries; none in a recalled message's tombstone, which withdraws them too."""
        return () if self.record.recalled_at is not None else self.record.attachment_ids


@dataclass(frozen=True, slots=True)
class ThreadPage:
    items: list[ThreadView]
    next_cursor: tuple[datetime, UUID] | None


@dataclass(frozen=True, slots=True)
class BreakGlassView:
    record: BreakGlassRecord
    reason: str | None  # None in the tombstone of a shredded patient's grant
    shredded_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class BreakGlassPage:
    items: list[BreakGlassView]
    next_cursor: tuple[datetime, UUID] | None


def _context(column: str, row: UUID, thread: UUID, sender: str | None = None) -> dict[str, str]:
    context = {"column": column, "row": str(row), "thread": str(thread), "schema": "1"}
    if sender is not None:
        context["sender"] = sender
    return context


def _subject_context(thread_id: UUID) -> dict[str, str]:
    return _context("threads.subject", thread_id, thread_id)


def _body_context(message: MessageRecord | tuple[UUID, UUID, str]) -> dict[str, str]:
    if isinstance(message, MessageRecord):
        return _context("messages.body", message.id, message.thread_id, message.sender)
    message_id, thread_id, sender = message
    return _context("messages.body", message_id, thread_id, sender)


def _check_break_glass_reason(reason: str) -> None:
    if not 10 <= len(reason) <= 500 or not reason.isprintable():
        raise InvalidRequestError([FieldProblem(("Break-Glass-Reason",), "length", "10 to 500 printable characters")])


class MessagingService:
    def __init__(
        self,
        db: Database,
        store: MessagingStore,
        consents: ConsentLedger,
        keyring: PatientKeyring,
        idempotency: IdempotencyStore,
        audit: AuditRecorder,
        *,
        attachments: AttachmentReferences,
        fingerprints: RequestFingerprints,
        recall_window: timedelta = timedelta(minutes=15),
        break_glass_duration: timedelta = timedelta(minutes=60),
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._db = db
        self._store = store
        self._consents = consents
        self._keyring = keyring
        self._idempotency = idempotency
        self._audit = audit
        self._attachments = attachments
        self._fingerprints = fingerprints
        self._recall_window = recall_window
        self._break_glass = break_glass_duration
        self._clock = clock

    # -- access (also used by attachments) --------------------------------------------------------------

    async def standing(
        self,
        tx: Tx,
        principal: Principal,
        patient: str,
        thread: ThreadRecord | None,
        *,
        teams: frozenset[str] | None = None,
    ) -> Standing:
        """What the caller is to this patient (and thread): teams, proxy consent, break-glass. Looks up
        only what can change the answer: a physician taking part directly needs neither their care teams
        nor a break-glass grant (this runs on every send and read). `teams`: the caller's current care
        teams if this transaction has already read them (with the thread)."""
        participants = frozenset(thread.participants) if thread is not None else frozenset()
        if principal.role is Role.PHYSICIAN and principal.subject in participants:
            return Standing()
        if principal.role not in (Role.PHYSICIAN, Role.STAFF):
            teams = frozenset()
        elif teams is None:
            teams = await self._store.teams_of(tx, principal.tenant_id, principal.subject)
        if principal.role is Role.PROXY and principal.act_for == patient:
            proxy = await self._consents.decide(tx, patient, principal.subject, Scope.PROXY)
            return Standing(teams, proxy.permit, proxy.include_sensitive)
        if principal.role is Role.PHYSICIAN and thread is not None and not teams & participants:
            grant = await self._store.active_break_glass(tx, principal.tenant_id, thread.id, principal.subject)
            return Standing(teams, break_glass=grant is not None)
        return Standing(teams)

    async def access(
        self, tx: Tx, principal: Principal, thread_id: UUID, *, write: bool
    ) -> tuple[ThreadRecord, Access]:
        """The thread and what the caller may do with it; NotFoundError (audited) if not enough."""
        thread = await self._store.thread(tx, principal.tenant_id, thread_id)
        return await self._access_to(tx, principal, thread, write=write)

    async def _access_to(
        self,
        tx: Tx,
        principal: Principal,
        thread: ThreadRecord | None,
        *,
        write: bool,
        teams: frozenset[str] | None = None,
    ) -> tuple[ThreadRecord, Access]:
        """`access` to a thread this transaction has already read (None: no such thread)."""
        access = Access.NONE
        if thread is not None:
            standing = await self.standing(tx, principal, thread.patient, thread, teams=teams)
            access = thread_access(principal, _facts(thread), standing)
        if access is Access.NONE or (write and access is not Access.WRITE):
            await self._deny(principal, thread, "write" if write else "read")
        assert thread is not None
        return thread, access

    async def require_consent(
        self, tx: Tx, principal: Principal, thread: ThreadRecord, action: AuditAction
    ) -> list[Decision]:
        """Every practitioner or care team of the thread must have the patient's messaging consent now;
        else the attempt is recorded (with the deciding consents) and refused with 403 consent-required."""
        decisions = await self._consents.decide_many(tx, thread.patient, thread.participants, Scope.MESSAGING)
        return _consented(principal, thread, action, decisions)

    # -- threads -----------------------------------------------------------------------------------

    async def create_thread(
        self,
        principal: Principal,
        *,
        patient: str,
        participants: Sequence[str],
        subject: str,
        priority: str,
        sensitive: bool,
        first_message: str | None,
        idempotency_key: str | None = None,
    ) -> tuple[ThreadView, MessageView | None]:
        _check_thread(patient, participants, subject)
        if first_message is not None:
            _check_body(first_message)
        members = frozenset(participants)
        thread_id = uuid.uuid4()
        message_id = None if first_message is None else uuid.uuid4()
        async with self._db.transaction(principal.tenant_id) as tx:
            if idempotency_key is not None:
                fingerprint = await self._fingerprints.of(
                    tx, ["thread", patient, sorted(members), subject, priority, sensitive, first_message]
                )
                response = {"thread_id": str(thread_id), "message_id": None if message_id is None else str(message_id)}
                claim = IdempotencyClaim(principal.subject, idempotency_key, fingerprint, (201, response))
                stored = await self._idempotency.claim(tx, principal.tenant_id, claim)
                if stored is not None:
                    return await self._replay_thread(tx, principal, stored, fingerprint)
            standing = await self.standing(tx, principal, patient, None)
            if not can_start_thread(principal, patient, members, standing, sensitive=sensitive):
                await self._deny(principal, None, "create", patient=patient)
            draft = ThreadRecord(
                id=thread_id,
                tenant_id=principal.tenant_id,
                patient=patient,
                subject=b"",
                priority=priority,
                sensitive=sensitive,
                status="open",
                created_by=principal.subject,
                created_at=self._clock(),
                closed_at=None,
                last_seq=0,
                last_activity=self._clock(),
                participants=tuple(sorted(members)),
            )
            decisions = await self.require_consent(tx, principal, draft, AuditAction.THREAD_CREATE)
            sealed = await self._keyring.seal_for(tx, patient, subject.encode(), _subject_context(thread_id))
            await self._store.create_thread(
                tx,
                principal.tenant_id,
                thread_id,
                patient,
                sealed,
                priority,
                sensitive,
                principal.subject,
                sorted(members),
            )
            await self._audit.record(
                tx,
                AuditEvent.by(
                    principal,
                    AuditAction.THREAD_CREATE,
                    patient=patient,
                    resource_type="Thread",
                    resource_id=str(thread_id),
                    details=_consent_details(decisions),
                ),
            )
            await self._store.notify(
                tx,
                principal.tenant_id,
                sorted(members - {principal.subject}),
                "thread.created",
                {"thread_id": str(thread_id)},
            )
            message = None
            if first_message is not None:
                message = await self._send_in(
                    tx, principal, draft, first_message, (), None, decisions, message_id=message_id
                )
            thread = await self._store.thread(tx, principal.tenant_id, thread_id)
        assert thread is not None
        return ThreadView(thread, subject, Access.WRITE, receipts=()), message  # new: nothing read, no receipts

    async def get_thread(
        self, principal: Principal, thread_id: UUID, break_glass_reason: str | None = None
    ) -> ThreadView:
        async with self._db.transaction(principal.tenant_id) as tx:
            thread, access = await self._reading(tx, principal, thread_id, break_glass_reason)
            purpose = ETREAT if access is Access.READ else None
            read = _on_thread(principal, AuditAction.THREAD_READ, thread, purpose=purpose)
            with recorded_if_shredded(read):
                subject = (await self._keyring.open(tx, thread.subject, _subject_context(thread.id))).decode()
            unread, receipts = await self._reader_state(tx, principal, thread.id)
            await self._audit.record(tx, read)
        return ThreadView(thread, subject, access, unread, receipts)

    async def _reader_state(
        self, tx: Tx, principal: Principal, thread_id: UUID
    ) -> tuple[int, tuple[ReceiptRecord, ...]]:
        """The caller's unread count and the thread's receipts, for an answer that shows one thread."""
        unread, receipts = await self._store.reader_state(tx, principal.tenant_id, thread_id, principal.subject)
        return unread, tuple(receipts)

    async def list_threads(
        self,
        principal: Principal,
        *,
        patient: str | None,
        status: str | None,
        unread_only: bool,
        cursor: tuple[datetime, UUID] | None,
        limit: int,
    ) -> ThreadPage:
        if not 1 <= limit <= 100:
            raise InvalidRequestError([FieldProblem(("limit",), "range", "between 1 and 100")])
        if patient is not None and not is_reference(patient, "Patient"):
            # Checked before the query: a filter with a NUL in it is one PostgreSQL refuses outright.
            raise InvalidRequestError([FieldProblem(("patient",), "reference", "a Patient/.. reference")])
        async with self._db.transaction(principal.tenant_id) as tx:
            as_patient, participants, hide_sensitive = None, [], False
            if principal.role is Role.PATIENT:
                as_patient = principal.subject
            elif principal.role is Role.PROXY and principal.act_for is not None:
                standing = await self.standing(tx, principal, principal.act_for, None)
                if standing.proxy_permit:
                    as_patient, hide_sensitive = principal.act_for, not standing.proxy_sensitive
            elif principal.role in (Role.PHYSICIAN, Role.STAFF):
                teams = await self._store.teams_of(tx, principal.tenant_id, principal.subject)
                participants = sorted(teams | ({principal.subject} if principal.role is Role.PHYSICIAN else set()))
            items = []
            if as_patient is not None or participants:
                items = await self._store.list_threads(
                    tx,
                    principal.tenant_id,
                    reader=principal.subject,
                    as_patient=as_patient,
                    as_participants=participants,
                    patient=patient,
                    status=status,
                    cursor=cursor,
                    limit=limit + 1,
                    hide_sensitive=hide_sensitive,
                    unread_only=unread_only,
                )
            views = []
            for item in items[:limit]:
                subject, shredded_at = await self._open_in_listing(
                    tx, item.thread.subject, _subject_context(item.thread.id)
                )
                views.append(ThreadView(item.thread, subject, Access.WRITE, item.unread, shredded_at=shredded_at))
            await self._audit.record(
                tx,
                AuditEvent.by(
                    principal,
                    AuditAction.THREAD_LIST,
                    resource_type="Thread",
                    details={"thread_ids": [str(v.record.id) for v in views]},
                ),
            )
        more = len(items) > limit
        last = items[limit - 1].thread if more else None
        return ThreadPage(views, (last.created_at, last.id) if last else None)

    async def close_thread(self, principal: Principal, thread_id: UUID) -> ThreadView:
        async with self._db.transaction(principal.tenant_id) as tx:
            thread, _ = await self.access(tx, principal, thread_id, write=True)
            if await self._store.close(tx, principal.tenant_id, thread.id, principal.subject) is None:
                raise ConflictError("the thread is already closed")
            await self._audit.record(
                tx,
                _on_thread(
                    principal,
                    AuditAction.THREAD_CLOSE,
                    thread,
                ),
            )
            closed = await self._store.thread(tx, principal.tenant_id, thread.id)
            assert closed is not None
            subject = (await self._keyring.open(tx, closed.subject, _subject_context(closed.id))).decode()
            unread, receipts = await self._reader_state(tx, principal, closed.id)
        return ThreadView(closed, subject, Access.WRITE, unread, receipts)

    # -- messages ----------------------------------------------------------------------------------

    async def send(
        self,
        principal: Principal,
        thread_id: UUID,
        body: str,
        *,
        attachment_ids: Sequence[UUID] = (),
        in_reply_to: UUID | None = None,
        idempotency_key: str | None = None,
    ) -> MessageView:
        _check_body(body)
        message_id = uuid.uuid4()
        async with self._db.transaction(principal.tenant_id) as tx:
            claim, fingerprint = None, b""
            if idempotency_key is not None:
                fingerprint = await self._fingerprints.of(
                    tx, ["message", thread_id, body, list(attachment_ids), in_reply_to]
                )
                # The response is known now (the message's id), so it is kept with the claim: the key's
                # row is written once, and commits with the message or not at all.
                claim = IdempotencyClaim(
                    principal.subject, idempotency_key, fingerprint, (201, {"message_id": str(message_id)})
                )
            # One round trip reads everything the decisions below need, and claims the idempotency key.
            facts = await self._store.send_facts(
                tx,
                principal.tenant_id,
                thread_id,
                scope=Scope.MESSAGING.value,
                teams_of=_teams_needed(principal),
                claim=claim,
            )
            if claim is not None and not facts.claimed:
                # The key is on record: the first request's (replayed), or expired (claimed anew here).
                stored = await self._idempotency.on_record(tx, principal.tenant_id, claim)
                if stored is not None:
                    return await self._replay_message(tx, principal, stored, fingerprint)
            thread, _ = await self._access_to(tx, principal, facts.thread, write=True, teams=facts.teams)
            decisions = _consented(
                principal,
                thread,
                AuditAction.MESSAGE_SEND,
                self._consents.decide_from(thread.participants, facts.consents),
            )
            await self._attachments.check_attachments(tx, principal.tenant_id, thread.id, attachment_ids)
            return await self._send_in(
                tx,
                principal,
                thread,
                body,
                attachment_ids,
                in_reply_to,
                decisions,
                key=facts.key,
                message_id=message_id,
            )

    async def send_within(
        self,
        tx: Tx,
        principal: Principal,
        thread_id: UUID,
        body: str,
        *,
        in_reply_to: UUID | None,
        message_id: UUID,
        evidence: Mapping[str, str],
        through: str,
    ) -> MessageView:
        """A send inside the caller's transaction (an inbound webhook reply, whose receipt commits with
        it): the same policy, consent, sealing, outbox and audit as `send`; `evidence` joins the audit
        event's details. `through`: the webhook endpoint's subscriber the reply came through. A care
        team's endpoint speaks for the team: its members may write in other threads (their own, another
        team's), but not through it, so the team must be a participant of this thread."""
        _check_body(body)
        thread, _ = await self.access(tx, principal, thread_id, write=True)
        if is_reference(through, "CareTeam") and through not in thread.participants:
            raise ForbiddenError("This endpoint's care team is not a participant of the thread").recording(
                _on_thread(
                    principal,
                    AuditAction.ACCESS_DENIED,
                    thread,
                    details={"attempt": "inbound-reply", **evidence},
                ).denied("endpoint-not-participant")
            )
        decisions = await self.require_consent(tx, principal, thread, AuditAction.MESSAGE_SEND)
        return await self._send_in(
            tx, principal, thread, body, (), in_reply_to, decisions, message_id=message_id, evidence=evidence
        )

    async def _send_in(
        self,
        tx: Tx,
        principal: Principal,
        thread: ThreadRecord,
        body: str,
        attachment_ids: Sequence[UUID],
        in_reply_to: UUID | None,
        decisions: list[Decision],
        *,
        key: DataKeyRecord | None = None,
        message_id: UUID | None = None,
        evidence: Mapping[str, str] | None = None,
    ) -> MessageView:
        """Seal and write one message. `key`: the patient's key row as this transaction read it for
        writing (else it is read here); `message_id`: the id to give it (made here if not given; given
        when an idempotency key's response names it); `evidence`: details added to its audit event."""
        if (
            in_reply_to is not None
            and await self._store.message_in_thread(tx, principal.tenant_id, thread.id, in_reply_to) is None
        ):
            raise InvalidRequestError([FieldProblem(("in_reply_to",), "unknown", "not a message of this thread")])
        message_id = message_id or uuid.uuid4()
        sealed = await self._keyring.seal_with(
            tx, thread.patient, key, body.encode(), _body_context((message_id, thread.id, principal.subject))
        )
        audit = self._audit.row(
            AuditEvent.by(
                principal,
                AuditAction.MESSAGE_SEND,
                patient=thread.patient,
                resource_type="Message",
                resource_id=str(message_id),
                details={"thread_id": str(thread.id), **_consent_details(decisions), **(evidence or {})},
            )
        )
        written = await self._store.send(
            tx,
            principal.tenant_id,
            thread.id,
            message_id,
            principal.subject,
            principal.role.value,
            sealed,
            in_reply_to,
            attachment_ids,
            [p for p in thread.participants if p != principal.subject],
            audit,
        )
        if written is None:
            raise ConflictError("the thread is closed")
        seq, created = written
        record = MessageRecord(
            message_id,
            thread.id,
            seq,
            principal.subject,
            principal.role.value,
            sealed,
            in_reply_to,
            tuple(attachment_ids),
            created,
            None,
            None,
        )
        return MessageView(record, body)

    async def messages(
        self,
        principal: Principal,
        thread_id: UUID,
        *,
        after: int | None,
        before: int | None,
        limit: int,
        break_glass_reason: str | None = None,
    ) -> list[MessageView]:
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidRequestError([FieldProblem(("limit",), "range", f"between 1 and {MAX_PAGE}")])
        async with self._db.transaction(principal.tenant_id) as tx:
            if break_glass_reason is None:
                # One round trip: the thread, what the access decision needs, the patient's key and the
                # page. The page is opened and handed out only if the policy allows this read.
                facts = await self._store.read_facts(
                    tx,
                    principal.tenant_id,
                    thread_id,
                    teams_of=_teams_needed(principal),
                    after=after,
                    before=before,
                    limit=limit,
                )
                thread, access = await self._access_to(tx, principal, facts.thread, write=False, teams=facts.teams)
                records, key = facts.messages, facts.key
            else:
                thread, access = await self._reading(tx, principal, thread_id, break_glass_reason)
                records = await self._store.messages(
                    tx, principal.tenant_id, thread.id, after=after, before=before, limit=limit
                )
                key = None
            read = _read_event(principal, thread, access, records, resource=("Thread", thread.id))
            with recorded_if_shredded(read):
                views = await self._views(tx, records, key)
            await self._audit.record(tx, read)
        return views

    async def message(self, principal: Principal, message_id: UUID) -> MessageView:
        async with self._db.transaction(principal.tenant_id) as tx:
            record = await self._store.message(tx, principal.tenant_id, message_id)
            if record is None:
                await self._deny(principal, None, "read")
            assert record is not None
            thread, access = await self.access(tx, principal, record.thread_id, write=False)
            read = _read_event(principal, thread, access, [record], resource=("Message", record.id))
            with recorded_if_shredded(read):
                (view,) = await self._views(tx, [record])
            await self._audit.record(tx, read)
        return view

    async def mark_read(self, principal: Principal, thread_id: UUID, up_to: int) -> ReceiptRecord:
        async with self._db.transaction(principal.tenant_id) as tx:
            thread, _ = await self.access(tx, principal, thread_id, write=True)
            if not 0 <= up_to <= thread.last_seq:
                raise InvalidRequestError([FieldProblem(("up_to",), "range", f"0 to {thread.last_seq}")])
            await self._store.lock_thread(tx, principal.tenant_id, thread.id)
            receipt = await self._store.mark_read(tx, principal.tenant_id, thread.id, principal.subject, up_to)
            await self._audit.record(
                tx,
                _on_thread(
                    principal,
                    AuditAction.RECEIPT_MARK,
                    thread,
                    details={"up_to": up_to},
                ),
            )
        return receipt

    async def recall(self, principal: Principal, message_id: UUID) -> MessageView:
        """The sender takes a message back: within the recall window AND before anyone else has read it.
        Both, because a message someone has read may already have been acted on: withdrawing it then would
        hide what the reader knew. The ciphertext stays; everyone sees a tombstone."""
        async with self._db.transaction(principal.tenant_id) as tx:
            record = await self._store.message(tx, principal.tenant_id, message_id)
            if record is None or record.sender != principal.subject:
                await self._deny(principal, None, "recall")
            assert record is not None
            thread, _ = await self.access(tx, principal, record.thread_id, write=True)
            if record.recalled_at is not None:
                raise ConflictError("the message is already recalled")
            if self._clock() - record.created_at > self._recall_window:
                raise ConflictError("the recall window has passed")
            await self._store.lock_thread(tx, principal.tenant_id, thread.id)
            if await self._store.read_by_others(tx, principal.tenant_id, thread.id, principal.subject, record.seq):
                raise ConflictError("the message has already been read")
            recalled_at = await self._store.recall(tx, principal.tenant_id, record.id, principal.subject)
            await self._store.notify(
                tx,
                principal.tenant_id,
                [p for p in thread.participants if p != principal.subject],
                "message.recalled",
                {"thread_id": str(thread.id), "message_id": str(record.id)},
            )
            await self._audit.record(
                tx,
                AuditEvent.by(
                    principal,
                    AuditAction.MESSAGE_RECALL,
                    patient=thread.patient,
                    resource_type="Message",
                    resource_id=str(record.id),
                ),
            )
        tombstone = MessageRecord(
            record.id,
            record.thread_id,
            record.seq,
            record.sender,
            record.sender_role,
            record.body,
            record.in_reply_to,
            record.attachment_ids,
            record.created_at,
            recalled_at,
            principal.subject,
        )
        return MessageView(tombstone, None)

    # -- break-glass review (compliance) ------------------------------------------------------------------

    async def break_glass_grants(
        self,
        principal: Principal,
        reviewed: bool | None,
        *,
        cursor: tuple[datetime, UUID] | None = None,
        limit: int = 50,
    ) -> BreakGlassPage:
        """The tenant's grants for review, newest first, a page at a time (every grant is reachable, however
        many wait for review)."""
        if not can_review_break_glass(principal):
            await self._deny(principal, None, "break-glass review")
        async with self._db.transaction(principal.tenant_id) as tx:
            found = await self._store.break_glass(tx, principal.tenant_id, reviewed, cursor, limit + 1)
            grants = found[:limit]
            views = []
            for grant in grants:
                reason, shredded_at = await self._open_in_listing(
                    tx, grant.reason, _context("break_glass.reason", grant.id, grant.thread_id)
                )
                views.append(BreakGlassView(grant, reason, shredded_at))
            await self._audit.record(
                tx,
                AuditEvent.by(
                    principal,
                    AuditAction.BREAK_GLASS_READ,
                    resource_type="BreakGlass",
                    details={"grant_ids": [str(g.id) for g in grants]},
                ),
            )
        last = grants[-1] if len(found) > limit else None
        return BreakGlassPage(views, (last.opened_at, last.id) if last else None)

    async def review_break_glass(self, principal: Principal, grant_id: UUID) -> None:
        if not can_review_break_glass(principal):
            await self._deny(principal, None, "break-glass review")
        async with self._db.transaction(principal.tenant_id) as tx:
            reviewed = await self._store.review_break_glass(tx, principal.tenant_id, grant_id, principal.subject)
            if reviewed:
                event = AuditEvent.by(
                    principal, AuditAction.BREAK_GLASS_REVIEW, resource_type="BreakGlass", resource_id=str(grant_id)
                )
                await self._audit.record(tx, event)
        if not reviewed:
            await self._deny_resource(principal, "BreakGlass", str(grant_id), "review")

    # -- care teams (admin) --------------------------------------------------------------------------------

    async def create_team(
        self, principal: Principal, team: str, members: Sequence[str]
    ) -> list[tuple[str, datetime, datetime | None]]:
        self._team_admin(principal, team, members)
        async with self._db.transaction(principal.tenant_id) as tx:
            if not await self._store.create_team(tx, principal.tenant_id, team, principal.subject):
                raise AlreadyExistsError("this care team exists")
            await self._audit.record(
                tx, AuditEvent.by(principal, AuditAction.CARE_TEAM_CREATE, resource_type="CareTeam", resource_id=team)
            )
            await self._consents.set_team_members(tx, principal.tenant_id, team, members, by=principal)
        return await self.team(principal, team, audited=False)

    async def set_members(
        self, principal: Principal, team: str, members: Sequence[str]
    ) -> list[tuple[str, datetime, datetime | None]]:
        """Make `members` the team's current members; joins and leaves are audited and kept as history."""
        self._team_admin(principal, team, members)
        async with self._db.transaction(principal.tenant_id) as tx:
            exists = await self._store.team_exists(tx, principal.tenant_id, team)
            if exists:
                await self._consents.set_team_members(tx, principal.tenant_id, team, members, by=principal)
        if not exists:
            await self._deny_resource(principal, "CareTeam", team, "set members")
        return await self.team(principal, team, audited=False)

    async def team(
        self, principal: Principal, team: str, *, audited: bool = True
    ) -> list[tuple[str, datetime, datetime | None]]:
        if not can_manage_care_teams(principal):
            await self._deny(principal, None, "care team")
        if not is_reference(team, "CareTeam"):
            # The team comes from the path: one that is no reference (a NUL, which PostgreSQL refuses
            # outright, a slash, a novel) names no team, and is not found like any unknown one.
            await self._deny_resource(principal, "CareTeam", team, "read")
        async with self._db.transaction(principal.tenant_id) as tx:
            exists = await self._store.team_exists(tx, principal.tenant_id, team)
            history = await self._store.team_members(tx, principal.tenant_id, team) if exists else []
            if exists and audited:
                await self._audit.record(
                    tx, AuditEvent.by(principal, AuditAction.CARE_TEAM_READ, resource_type="CareTeam", resource_id=team)
                )
        if not exists:
            await self._deny_resource(principal, "CareTeam", team, "read")
        return history

    # -- internals -----------------------------------------------------------------------------------

    def _team_admin(self, principal: Principal, team: str, members: Sequence[str]) -> None:
        if not can_manage_care_teams(principal):
            raise NotFoundError()
        problems = []
        if not is_reference(team, "CareTeam"):
            problems.append(FieldProblem(("team",), "reference", "a CareTeam/.. reference"))
        for index, member in enumerate(members):
            if not is_reference(member, "Practitioner"):
                problems.append(FieldProblem(("members", index), "reference", "a Practitioner/.. reference"))
        if problems:
            raise InvalidRequestError(problems)

    async def _reading(
        self, tx: Tx, principal: Principal, thread_id: UUID, break_glass_reason: str | None
    ) -> tuple[ThreadRecord, Access]:
        """Read access, opening a break-glass grant when a physician outside the thread gives a reason.
        A reason is checked whenever one is given, also when no grant is opened (a participant's, or a
        physician's whose grant is still running): a malformed header is refused the same every time."""
        if break_glass_reason is not None:
            _check_break_glass_reason(break_glass_reason)
        if break_glass_reason is not None and can_break_glass(principal):
            thread = await self._store.thread(tx, principal.tenant_id, thread_id)
            if thread is not None:
                standing = await self.standing(tx, principal, thread.patient, thread)
                if thread_access(principal, _facts(thread), standing) is Access.NONE:
                    await self._open_break_glass(tx, principal, thread, break_glass_reason)
        return await self.access(tx, principal, thread_id, write=False)

    async def _open_break_glass(self, tx: Tx, principal: Principal, thread: ThreadRecord, reason: str) -> None:
        grant_id = uuid.uuid4()
        # The reason is sealed with the patient's key: a crypto-shredded patient's thread cannot be
        # opened, and that refused emergency access is recorded like every other 410.
        with recorded_if_shredded(_on_thread(principal, AuditAction.BREAK_GLASS_OPEN, thread, purpose=ETREAT)):
            sealed = await self._keyring.seal_for(
                tx, thread.patient, reason.encode(), _context("break_glass.reason", grant_id, thread.id)
            )
        _, expires = await self._store.open_break_glass(
            tx,
            principal.tenant_id,
            grant_id,
            thread.id,
            principal.subject,
            sealed,
            int(self._break_glass.total_seconds()),
        )
        await self._audit.record(
            tx,
            _on_thread(
                principal,
                AuditAction.BREAK_GLASS_OPEN,
                thread,
                purpose=ETREAT,
                details={"grant_id": str(grant_id), "expires_at": expires.isoformat()},
            ),
        )

    async def _open_in_listing(
        self, tx: Tx, sealed: bytes, context: Mapping[str, str]
    ) -> tuple[str | None, datetime | None]:
        """One item of a listing that spans patients: its text, or, if its patient was crypto-shredded,
        no text and when (the item becomes a tombstone). One shredded patient must not make a whole page
        of everyone else's items answer 410; a resource read on its own still does."""
        try:
            return (await self._keyring.open(tx, sealed, context)).decode(), None
        except ShreddedError as shredded:
            return None, shredded.shredded_at

    async def _views(
        self, tx: Tx, records: Sequence[MessageRecord], key: DataKeyRecord | None = None
    ) -> list[MessageView]:
        live = [r for r in records if r.recalled_at is None]
        bodies = dict(
            zip(
                (r.id for r in live),
                await self._keyring.open_many(tx, [(r.body, _body_context(r)) for r in live], key),
                strict=True,
            )
        )
        return [MessageView(r, bodies[r.id].decode() if r.id in bodies else None) for r in records]

    async def _replay_message(
        self, tx: Tx, principal: Principal, stored: StoredResponse, fingerprint: bytes
    ) -> MessageView:
        response = replayable(stored, fingerprint)
        record = await self._store.message(tx, principal.tenant_id, UUID(str(response["message_id"])))
        if record is None:
            raise ConflictError("the first request with this key did not complete")
        thread, access = await self.access(tx, principal, record.thread_id, write=False)
        # A replay hands the message back: it is a read, and recorded as one (failed, if it meets a shred).
        read = _read_event(principal, thread, access, [record], resource=("Message", record.id))
        with recorded_if_shredded(read):
            (view,) = await self._views(tx, [record])
        await self._audit.record(tx, read)
        return MessageView(view.record, view.body, replayed=True)

    async def _replay_thread(
        self, tx: Tx, principal: Principal, stored: StoredResponse, fingerprint: bytes
    ) -> tuple[ThreadView, MessageView | None]:
        response = replayable(stored, fingerprint)
        thread, access = await self.access(tx, principal, UUID(str(response["thread_id"])), write=False)
        thread_read = _on_thread(principal, AuditAction.THREAD_READ, thread, details={"replay": True})
        with recorded_if_shredded(thread_read):
            subject = (await self._keyring.open(tx, thread.subject, _subject_context(thread.id))).decode()
        await self._audit.record(tx, thread_read)
        unread, receipts = await self._reader_state(tx, principal, thread.id)
        message = None
        if response.get("message_id"):
            record = await self._store.message(tx, principal.tenant_id, UUID(str(response["message_id"])))
            if record is not None:
                read = _read_event(principal, thread, access, [record], resource=("Message", record.id))
                with recorded_if_shredded(read):
                    (message,) = await self._views(tx, [record])
                await self._audit.record(tx, read)
        return ThreadView(thread, subject, access, unread, receipts, replayed=True), message

    async def _deny_resource(self, principal: Principal, resource_type: str, resource_id: str, attempt: str) -> None:
        """Not found, or not the caller's: both answer 404, and the attempt is audited."""
        raise NotFoundError().recording(
            AuditEvent.by(
                principal,
                AuditAction.ACCESS_DENIED,
                resource_type=resource_type,
                resource_id=resource_id[:200],
                details={"attempt": attempt},
            ).denied("not-found")
        )

    async def _deny(
        self, principal: Principal, thread: ThreadRecord | None, attempt: str, patient: str | None = None
    ) -> None:
        raise NotFoundError().recording(
            AuditEvent.by(
                principal,
                AuditAction.ACCESS_DENIED,
                patient=patient or (thread.patient if thread else None),
                resource_type="Thread",
                resource_id=str(thread.id) if thread else None,
                details={"attempt": attempt},
            ).denied("policy")
        )


def _teams_needed(principal: Principal) -> str | None:
    """Whose care teams an access decision may need (read along with the thread), if anyone's."""
    return principal.subject if principal.role in (Role.PHYSICIAN, Role.STAFF) else None


def _consented(
    principal: Principal, thread: ThreadRecord, action: AuditAction, decisions: list[Decision]
) -> list[Decision]:
    """The decisions, if every one permits; else the attempt is recorded (with the deciding consents) and
    refused with 403 consent-required."""
    if not all(d.permit for d in decisions):
        raise ConsentRequiredError(
            "The patient's messaging consent is not in force for everyone in this thread"
        ).recording(
            _on_thread(
                principal,
                action,
                thread,
                details=_consent_details(decisions),
            ).denied("consent-required")
        )
    return decisions


def _read_event(
    principal: Principal,
    thread: ThreadRecord,
    access: Access,
    records: Sequence[MessageRecord],
    *,
    resource: tuple[str, UUID],
) -> AuditEvent:
    """A read of messages, audited with the messages it returned; a break-glass read with purpose ETREAT.

    The messages are named by their thread and the range of sequence numbers returned: a thread's
    sequence is dense and its messages are never deleted, so a page is exactly the messages from
    `first_seq` to `last_seq`, and the event stays the same small size whatever the page's."""
    details: dict[str, Any] = {"thread_id": str(thread.id), "returned": len(records)}
    if records:
        details.update(first_seq=records[0].seq, last_seq=records[-1].seq)
    return AuditEvent.by(
        principal,
        AuditAction.MESSAGE_READ,
        patient=thread.patient,
        resource_type=resource[0],
        resource_id=str(resource[1]),
        purpose=ETREAT if access is Access.READ else None,
        details=details,
    )


@contextlib.contextmanager
def recorded_if_shredded(access: AuditEvent) -> Iterator[None]:
    """Reaching a patient's content for `access` (a read, a break-glass opening): if the patient was
    crypto-shredded, the 410 is recorded as that access, failed (reason `shredded`), like every other
    access that was asked for and not served."""
    try:
        yield
    except ShreddedError as shredded:
        raise shredded.recording(access.failed("shredded")) from None


def _on_thread(principal: Principal, action: AuditAction, thread: ThreadRecord, **fields: object) -> AuditEvent:
    """An audit event by `principal` about `thread` (and so about its patient)."""
    return AuditEvent.by(
        principal, action, patient=thread.patient, resource_type="Thread", resource_id=str(thread.id), **fields
    )


def _facts(thread: ThreadRecord) -> ThreadFacts:
    return ThreadFacts(thread.patient, frozenset(thread.participants), thread.sensitive)


def _consent_details(decisions: Sequence[Decision]) -> dict[str, Any]:
    return {
        "consent_decision": "permit" if all(d.permit for d in decisions) else "deny",
        "consent_ids": [str(d.consent_id) for d in decisions if d.consent_id is not None],
        "consent_reasons": sorted({d.reason for d in decisions}),
    }


def _check_body(body: str) -> None:
    size = len(body.encode("utf-8", errors="surrogatepass"))
    if not body or size > MAX_BODY_BYTES:
        raise InvalidRequestError([FieldProblem(("body",), "size", f"1 byte to {MAX_BODY_BYTES // 1024} KiB of text")])
    try:
        body.encode()
    except UnicodeEncodeError:
        raise InvalidRequestError([FieldProblem(("body",), "text", "valid Unicode text")]) from None


def _check_thread(patient: str, participants: Sequence[str], subject: str) -> None:
    problems = []
    if not is_reference(patient, "Patient"):
        problems.append(FieldProblem(("patient",), "reference", "a Patient/.. reference"))
    if not participants or len(participants) > 20:
        problems.append(FieldProblem(("participants",), "count", "1 to 20 practitioners or care teams"))
    for index, participant in enumerate(participants):
        if not (is_reference(participant, "Practitioner") or is_reference(participant, "CareTeam")):
            problems.append(FieldProblem(("participants", index), "reference", "Practitioner/.. or CareTeam/.."))
    if not 1 <= len(subject) <= MAX_SUBJECT_CHARS or not is_plain_text(subject, MAX_SUBJECT_CHARS):
        problems.append(FieldProblem(("subject",), "text", f"1 to {MAX_SUBJECT_CHARS} printable characters"))
    if problems:
        raise InvalidRequestError(problems)
