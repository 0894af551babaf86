"""The consent ledger: what each patient has permitted, append-only, and the one decision function
every movement of data asks.

Each line of consent is a key (patient, grantee, scope, item). Appending a grant or a revoke takes the
key's transaction lock, reads the clock after it, writes the event and makes it the key's current state
in the same transaction: two racing appends serialize, and the later commit is both the state and the
later `recorded_at`. `decide` reads the current state (one indexed lookup, plus the grantee's care
teams); a question about the past reads the events recorded by then.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any
from uuid import UUID

from crypto.merkle import FieldValue, encode_fields
from service.domain.audit import AuditAction, AuditEvent, AuditRecorder, format_time
from service.domain.idempotency import RequestFingerprints, replayable
from service.domain.policy import can_read_consents, can_record_consent, can_revoke_consent
from service.domain.principal import Principal, Role, is_plain_text, is_reference
from service.errors import ConflictError, FieldProblem, InvalidRequestError, NotFoundError, UnavailableError
from service.store.consents import ConsentEventRecord, ConsentKey, ConsentStateRecord, ConsentStore
from service.store.db import Database, Tx
from service.store.idempotency import IdempotencyClaim, IdempotencyStore, StoredResponse
from service.store.webhooks import WebhookStore

CONSENT_FORMAT = "bedside-consent/1"
PUBLIC = "public"


class Scope(StrEnum):
    MESSAGING = "messaging"
    PROXY = "proxy"
    DISCLOSURE = "disclosure"
    PUBLIC_SHARE = "public_share"


class EvidenceMethod(StrEnum):
    PORTAL = "portal"  # click-through, with the consent text's version
    PAPER = "paper"  # a scanned form, by reference
    VERBAL = "verbal"  # with a witness


class RevokeReason(StrEnum):
    PATIENT_REQUEST = "patient-request"
    CARE_ENDED = "care-ended"
    PROXY_ENDED = "proxy-ended"
    ENTERED_IN_ERROR = "entered-in-error"
    OTHER = "other"


# Evidence names things (a consent text's version, a scanned form): identifiers, never prose.
_EVIDENCE_TEXT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/\-]{0,199}$")
# A purpose of use is a code (v3 ActReason, e.g. TREAT, HPAYMT, PUBHLTH).
_PURPOSE = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]{0,39}$")

# Who may be a grantee of each scope (resource types of the reference, or the literal "public").
GRANTEE_TYPES: dict[Scope, frozenset[str]] = {
    Scope.MESSAGING: frozenset({"Practitioner", "CareTeam"}),
    Scope.PROXY: frozenset({"RelatedPerson"}),
    Scope.DISCLOSURE: frozenset({"Organization", "Practitioner", "RelatedPerson"}),
    Scope.PUBLIC_SHARE: frozenset({PUBLIC}),
}


@dataclass(frozen=True, slots=True)
class Evidence:
    method: EvidenceMethod
    text_version: str | None = None
    document_ref: str | None = None
    witness: str | None = None

    def problems(self, recorded_by: str) -> list[FieldProblem]:
        """What is wrong with this evidence for a consent event that `recorded_by` records. A verbal
        consent's witness is someone other than the recorder: a clinician cannot witness the consent they
        record (a grant to themselves, say), or it would rest on their word alone."""
        needs = {
            EvidenceMethod.PORTAL: ("text_version", self.text_version),
            EvidenceMethod.PAPER: ("document_ref", self.document_ref),
            EvidenceMethod.VERBAL: ("witness", self.witness),
        }[self.method]
        out = []
        if not is_plain_text(needs[1], 200):
            out.append(FieldProblem(("evidence", needs[0]), "required", f"{self.method.value} evidence needs it"))
        for name in ("text_version", "document_ref"):
            value = getattr(self, name)
            if value is not None and name != needs[0] and not _EVIDENCE_TEXT.fullmatch(value):
                out.append(FieldProblem(("evidence", name), "format", "an identifier: letters, digits, . _ - : /"))
        if needs[1] is not None and not _EVIDENCE_TEXT.fullmatch(needs[1]) and needs[0] != "witness":
            out.append(FieldProblem(("evidence", needs[0]), "format", "an identifier: letters, digits, . _ - : /"))
        if self.witness is not None and not is_reference(self.witness, "Practitioner"):
            out.append(FieldProblem(("evidence", "witness"), "reference", "a Practitioner/.. reference"))
        elif self.witness is not None and self.witness == recorded_by:
            out.append(FieldProblem(("evidence", "witness"), "witness", "someone other than the one recording it"))
        return out

    def as_dict(self) -> dict[str, str]:
        values = {
            "method": self.method.value,
            "text_version": self.text_version,
            "document_ref": self.document_ref,
            "witness": self.witness,
        }
        return {k: v for k, v in values.items() if v is not None}


@dataclass(frozen=True, slots=True)
class ConsentRequest:
    patient: str
    grantee: str
    scope: Scope
    evidence: Evidence
    item: str = ""
    purpose: str | None = None
    valid_from: datetime | None = None
    valid_until: datetime | None = None
    include_sensitive: bool = False

    def identity(self) -> dict[str, object]:
        """What makes two requests the same request (fingerprinted for idempotency keys)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class Decision:
    """Permit or deny; the consent event that decided it; why (a code)."""

    permit: bool
    reason: str
    consent_id: UUID | None = None
    include_sensitive: bool = False

    def audit_details(self) -> dict[str, str | None]:
        """What the audit event of the work this decision allowed or refused carries."""
        return {
            "consent_decision": "permit" if self.permit else "deny",
            "consent_reason": self.reason,
            "consent_id": None if self.consent_id is None else str(self.consent_id),
        }


@dataclass(frozen=True, slots=True)
class ConsentView:
    record: ConsentEventRecord
    status: str  # active (in force now) | inactive
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class ConsentHistory:
    patient: str
    as_of: datetime
    in_force: list[ConsentEventRecord]
    events: list[ConsentEventRecord]


def _evaluate(kind: str, valid_from: datetime | None, valid_until: datetime | None, at: datetime) -> str:
    if kind == "revoke":
        return "revoked"
    if valid_from is not None and at < valid_from:
        return "not-yet-valid"
    if valid_until is not None and at >= valid_until:
        return "expired"
    return "granted"


_DENY_ORDER = ("revoked", "expired", "not-yet-valid")


def _choose(grantee: str, candidates: list[tuple[str, UUID, bool, str]]) -> Decision:
    """The decision among (grantee, event, include_sensitive, outcome) candidates: any grant in force
    permits, a direct consent to the grantee before one to a team it belongs to; else the most telling
    reason to deny."""
    candidates = sorted(candidates, key=lambda c: c[0] != grantee)
    for _, event_id, sensitive, outcome in candidates:
        if outcome == "granted":
            return Decision(True, "granted", event_id, sensitive)
    for reason in _DENY_ORDER:
        for _, event_id, _, outcome in candidates:
            if outcome == reason:
                return Decision(False, reason, event_id)
    return Decision(False, "no-consent")


def consent_hash(event: ConsentEventRecord) -> bytes:
    """SHA-256 of the event's canonical encoding: what its audit event carries into the Merkle log."""
    fields: list[tuple[str, FieldValue]] = [
        ("format", CONSENT_FORMAT),
        ("id", str(event.id)),
        ("tenant_id", str(event.tenant_id)),
        ("patient", event.key.patient),
        ("grantee", event.key.grantee),
        ("scope", event.key.scope),
        ("item", event.key.item),
        ("purpose", event.purpose),
        ("kind", event.kind),
        ("revokes", None if event.revokes is None else str(event.revokes)),
        ("valid_from", None if event.valid_from is None else format_time(event.valid_from)),
        ("valid_until", None if event.valid_until is None else format_time(event.valid_until)),
        ("include_sensitive", int(event.include_sensitive)),
        ("evidence", json.dumps(event.evidence, sort_keys=True, separators=(",", ":"))),
        ("reason", event.reason),
        ("recorded_by", event.recorded_by),
        ("recorded_role", event.recorded_role),
        ("recorded_at", format_time(event.recorded_at)),
        ("version", event.version),
    ]
    return hashlib.sha256(encode_fields(fields)).digest()


class ConsentLedger:
    def __init__(
        self,
        db: Database,
        store: ConsentStore,
        idempotency: IdempotencyStore,
        audit: AuditRecorder,
        *,
        fingerprints: RequestFingerprints,
        proxy_max_validity: timedelta = timedelta(days=548),
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        outbox: WebhookStore | None = None,
    ) -> None:
        self._outbox = outbox or WebhookStore()
        self._db = db
        self._store = store
        self._idempotency = idempotency
        self._fingerprints = fingerprints
        self._audit = audit
        self._proxy_max = proxy_max_validity
        self._clock = clock

    # -- the decision ---------------------------------------------------------------------------------

    async def decide(
        self, tx: Tx, patient: str, grantee: str, scope: Scope, *, at: datetime | None = None, item: str = ""
    ) -> Decision:
        """May data move between `patient` and `grantee` under `scope` now (or at `at`)? Inside the
        caller's transaction, so the decision and the work it allows see the same ledger."""
        if tx.tenant_id is None:
            raise RuntimeError("consent is decided within a tenant")
        key = ConsentKey(patient, grantee, scope.value, item)
        candidates: list[tuple[str, UUID, bool, str]]  # (grantee, event id, include_sensitive, outcome)
        if at is None:
            moment = self._clock()
            states = await self._store.current(tx, tx.tenant_id, key)
            candidates = [
                (s.grantee, s.event_id, s.include_sensitive, _evaluate(s.kind, s.valid_from, s.valid_until, moment))
                for s in states
            ]
        else:
            events = await self._store.at(tx, tx.tenant_id, key, at)
            candidates = [
                (e.key.grantee, e.id, e.include_sensitive, _evaluate(e.kind, e.valid_from, e.valid_until, at))
                for e in events
            ]
        return _choose(grantee, candidates)

    async def decide_many(self, tx: Tx, patient: str, grantees: Sequence[str], scope: Scope) -> list[Decision]:
        """`decide` for several grantees now, in one query (a thread's practitioners and care teams)."""
        if tx.tenant_id is None:
            raise RuntimeError("consent is decided within a tenant")
        found = await self._store.current_many(tx, tx.tenant_id, patient, scope.value, grantees)
        return self.decide_from(grantees, found)

    def decide_from(
        self, grantees: Sequence[str], states: Mapping[str, Sequence[ConsentStateRecord]]
    ) -> list[Decision]:
        """`decide_many` on consent states the caller's transaction has just read (with the rows of
        `current_many_sql`, for one patient and scope), so a use case can fetch them in the same round
        trip as the rest of what it decides on. A grantee without states is denied (no consent)."""
        moment = self._clock()
        return [
            _choose(
                grantee,
                [
                    (s.grantee, s.event_id, s.include_sensitive, _evaluate(s.kind, s.valid_from, s.valid_until, moment))
                    for s in states.get(grantee, ())
                ],
            )
            for grantee in grantees
        ]

    async def decide_now(
        self, tenant_id: UUID, patient: str, grantee: str, scope: Scope, *, item: str = ""
    ) -> Decision:
        """`decide` in a transaction of its own. A ledger that cannot be read is a denial."""
        try:
            async with self._db.transaction(tenant_id) as tx:
                return await self.decide(tx, patient, grantee, scope, item=item)
        except UnavailableError:
            return Decision(False, "ledger-unavailable")

    # -- recording -----------------------------------------------------------------------------------

    async def grant(
        self, principal: Principal, request: ConsentRequest, idempotency_key: str | None = None
    ) -> ConsentView:
        """Record a grant. Repeating a request with the same `Idempotency-Key` returns the first result."""
        self._check_request(request, principal)
        if not can_record_consent(principal, request.patient, request.evidence.method.value):
            await self._deny(principal, request.patient, "consent:grant")
        async with self._db.transaction(principal.tenant_id) as tx:
            if idempotency_key is not None:
                fingerprint = await self._fingerprints.of(tx, request.identity())
                stored = await self._idempotency.claim(
                    tx, principal.tenant_id, IdempotencyClaim(principal.subject, idempotency_key, fingerprint)
                )
                if stored is not None:
                    return await self._replay(tx, principal, stored, fingerprint)
            key = ConsentKey(request.patient, request.grantee, request.scope.value, request.item)
            event = await self._append(
                tx,
                principal,
                key,
                kind="grant",
                purpose=request.purpose,
                valid_from=request.valid_from,
                valid_until=request.valid_until,
                include_sensitive=request.include_sensitive,
                evidence=request.evidence.as_dict(),
            )
            if idempotency_key is not None:
                await self._idempotency.complete(
                    tx, principal.tenant_id, principal.subject, idempotency_key, 201, {"consent_id": str(event.id)}
                )
        return ConsentView(event, self._status(event, current=True))

    async def revoke(
        self, principal: Principal, consent_id: UUID, reason: RevokeReason, evidence: Evidence | None
    ) -> ConsentView:
        """Revoke a grant that is in force as its key's current state. Takes effect for the next request."""
        if evidence is not None and (problems := evidence.problems(principal.subject)):
            raise InvalidRequestError(problems)
        async with self._db.transaction(principal.tenant_id) as tx:
            grant = await self._store.by_id(tx, principal.tenant_id, consent_id)
            allowed = grant is not None and can_revoke_consent(
                principal, grant.key.patient, grant.key.scope, None if evidence is None else evidence.method.value
            )
            if grant is not None and allowed and principal.role is Role.PROXY:
                proxy = await self.decide(tx, grant.key.patient, principal.subject, Scope.PROXY)
                allowed = proxy.permit
        if grant is None or not allowed:
            await self._deny(principal, grant.key.patient if grant else None, "consent:revoke")
        assert grant is not None
        async with self._db.transaction(principal.tenant_id) as tx:
            # Revoking a line of consent revokes whatever grant is in force on it now: a grant renewed
            # meanwhile is revoked too, rather than the patient's revocation failing.
            _, _, current = await self._store.lock_key(tx, principal.tenant_id, grant.key)
            state = await self._store.state_of(tx, principal.tenant_id, grant.key)
            if grant.kind != "grant" or current is None or state is None or state.kind != "grant":
                raise ConflictError("this consent is not in force: already revoked")
            event = await self._append(
                tx,
                principal,
                grant.key,
                kind="revoke",
                revokes=current,
                purpose=grant.purpose,
                evidence=(evidence or Evidence(EvidenceMethod.PORTAL, text_version="revocation")).as_dict(),
                reason=reason.value,
            )
            # The grantee's systems hear that the consent ended (its id only), in the same transaction.
            await self._outbox.enqueue(
                tx, principal.tenant_id, [grant.key.grantee], "consent.revoked", {"consent_id": str(current)}
            )
        return ConsentView(event, "inactive")

    # -- reading -------------------------------------------------------------------------------------

    async def history(self, principal: Principal, patient: str, as_of: datetime | None = None) -> ConsentHistory:
        """What was in force at `as_of` (default now), and the full history of the patient's consents."""
        if not is_reference(patient, "Patient") or not can_read_consents(principal, patient):
            await self._deny(principal, patient if is_reference(patient, "Patient") else None, "consent:read")
        moment = as_of or self._clock()
        async with self._db.transaction(principal.tenant_id) as tx:
            latest = await self._store.latest_as_of(tx, principal.tenant_id, patient, moment)
            events = await self._store.history(tx, principal.tenant_id, patient)
            await self._audit.record(
                tx,
                AuditEvent.by(
                    principal,
                    AuditAction.CONSENT_READ,
                    patient=patient,
                    resource_type="Consent",
                    details={"events": len(events)},
                ),
            )
        in_force = [e for e in latest if _evaluate(e.kind, e.valid_from, e.valid_until, moment) == "granted"]
        return ConsentHistory(patient, moment, in_force, events)

    async def get(self, principal: Principal, consent_id: UUID) -> ConsentView:
        async with self._db.transaction(principal.tenant_id) as tx:
            event = await self._store.by_id(tx, principal.tenant_id, consent_id)
            if event is not None and can_read_consents(principal, event.key.patient):
                current = await self._store.current(tx, principal.tenant_id, event.key)
                await self._audit.record(
                    tx,
                    AuditEvent.by(
                        principal,
                        AuditAction.CONSENT_READ,
                        patient=event.key.patient,
                        resource_type="Consent",
                        resource_id=str(event.id),
                    ),
                )
                is_current = any(s.event_id == event.id and s.grantee == event.key.grantee for s in current)
                return ConsentView(event, self._status(event, current=is_current))
        await self._deny(principal, event.key.patient if event else None, "consent:read")
        raise AssertionError("unreachable")

    # -- care teams (membership is what a CareTeam consent covers) ----------------------------------------

    async def set_team_members(
        self, tx: Tx, tenant_id: UUID, team: str, members: Collection[str], *, by: Principal | None = None
    ) -> None:
        """Make `members` the team's current members, in the caller's transaction: every join and leave
        commits with the others or none does, and each is audited. Changes of one team serialize, so two
        concurrent calls apply one after the other, each to the members the other left."""
        await self._store.lock_team(tx, tenant_id, team)
        current = await self._store.current_members(tx, tenant_id, team)
        for member in sorted(set(members) - current):
            await self._store.join_team(tx, tenant_id, team, member)
            await self._team_event(tx, tenant_id, AuditAction.CARE_TEAM_JOIN, team, member, by)
        for member in sorted(current - set(members)):
            await self._store.leave_team(tx, tenant_id, team, member)
            await self._team_event(tx, tenant_id, AuditAction.CARE_TEAM_LEAVE, team, member, by)

    async def _team_event(
        self, tx: Tx, tenant_id: UUID, action: AuditAction, team: str, member: str, by: Principal | None
    ) -> None:
        fields: dict[str, Any] = {"resource_type": "CareTeam", "resource_id": team, "details": {"member": member}}
        event = AuditEvent.by_principal_or_operator(by, action, tenant_id, **fields)
        await self._audit.record(tx, event)

    # -- internals -----------------------------------------------------------------------------------

    def _status(self, event: ConsentEventRecord, *, current: bool) -> str:
        if event.kind == "grant" and current:
            return (
                "active"
                if _evaluate("grant", event.valid_from, event.valid_until, self._clock()) == "granted"
                else "inactive"
            )
        return "inactive"

    async def _append(
        self,
        tx: Tx,
        principal: Principal,
        key: ConsentKey,
        *,
        kind: str,
        evidence: Mapping[str, str],
        purpose: str | None = None,
        valid_from: datetime | None = None,
        valid_until: datetime | None = None,
        include_sensitive: bool = False,
        revokes: UUID | None = None,
        reason: str | None = None,
    ) -> ConsentEventRecord:
        now, version, _ = await self._store.lock_key(tx, principal.tenant_id, key)  # idempotent within a tx
        draft = ConsentEventRecord(
            id=uuid.uuid4(),
            tenant_id=principal.tenant_id,
            key=key,
            purpose=purpose,
            kind=kind,
            revokes=revokes,
            valid_from=valid_from,
            valid_until=valid_until,
            include_sensitive=include_sensitive,
            evidence=dict(evidence),
            reason=reason,
            recorded_by=principal.subject,
            recorded_role=principal.role.value,
            recorded_at=now,
            version=version + 1,
            hash=b"",
        )
        event = ConsentEventRecord(**{**_fields(draft), "hash": consent_hash(draft)})
        await self._store.append(tx, event)
        action = AuditAction.CONSENT_GRANT if kind == "grant" else AuditAction.CONSENT_REVOKE
        await self._audit.record(
            tx,
            AuditEvent.by(
                principal,
                action,
                patient=key.patient,
                resource_type="Consent",
                resource_id=str(event.id),
                details={
                    "consent_hash": event.hash.hex(),
                    "scope": key.scope,
                    "grantee": key.grantee,
                    "version": event.version,
                },
            ),
        )
        return event

    async def _replay(self, tx: Tx, principal: Principal, stored: StoredResponse, fingerprint: bytes) -> ConsentView:
        response = replayable(stored, fingerprint)
        event = await self._store.by_id(tx, principal.tenant_id, UUID(str(response["consent_id"])))
        if event is None:
            raise ConflictError("the first request with this key did not complete")
        current = await self._store.current(tx, principal.tenant_id, event.key)
        is_current = any(s.event_id == event.id for s in current)
        return ConsentView(event, self._status(event, current=is_current), replayed=True)

    def _check_request(self, request: ConsentRequest, principal: Principal) -> None:
        problems = request.evidence.problems(principal.subject)
        if not is_reference(request.patient, "Patient"):
            problems.append(FieldProblem(("patient",), "reference", "a Patient/.. reference"))
        allowed = GRANTEE_TYPES[request.scope]
        grantee_type = request.grantee if request.grantee == PUBLIC else request.grantee.split("/", 1)[0]
        if grantee_type not in allowed or (request.grantee != PUBLIC and not is_reference(request.grantee)):
            problems.append(
                FieldProblem(("grantee",), "grantee", f"for {request.scope.value}: {', '.join(sorted(allowed))}")
            )
        needs_item = request.scope in (Scope.DISCLOSURE, Scope.PUBLIC_SHARE)
        if needs_item != bool(request.item) or (request.item and not is_reference(request.item)):
            problems.append(
                FieldProblem(("item",), "item", "a named item (reference) for disclosure and public_share only")
            )
        if (request.scope is Scope.DISCLOSURE) != bool(request.purpose) or (
            request.purpose is not None and not _PURPOSE.fullmatch(request.purpose)
        ):
            problems.append(FieldProblem(("purpose",), "purpose", "a purpose-of-use code, for disclosure only"))
        if request.include_sensitive and request.scope is not Scope.PROXY:
            problems.append(FieldProblem(("include_sensitive",), "scope", "only a proxy consent includes it"))
        if request.valid_from and request.valid_until and request.valid_until <= request.valid_from:
            problems.append(FieldProblem(("valid_until",), "range", "after valid_from"))
        if request.scope is Scope.PROXY:
            limit = self._clock() + self._proxy_max
            if request.valid_until is None or request.valid_until > limit:
                problems.append(
                    FieldProblem(
                        ("valid_until",), "proxy-validity", f"a proxy consent ends within {self._proxy_max.days} days"
                    )
                )
        if problems:
            raise InvalidRequestError(problems)

    async def _deny(self, principal: Principal, patient: str | None, what: str) -> None:
        raise NotFoundError().recording(
            AuditEvent.by(
                principal,
                AuditAction.ACCESS_DENIED,
                patient=patient,
                resource_type="Consent",
                details={"attempt": what},
            ).denied("policy")
        )


def _fields(record: ConsentEventRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in record.__slots__}
