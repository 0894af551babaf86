"""Recording audit events: typed, identifiers only, written in the transaction of the work they record.

`AuditRecorder.record(tx, event)` inserts into the outbox inside the caller's transaction, so the work
and its event commit together or not at all (fail closed). Denials are recorded with
`record_alone`, in a transaction of their own, since the work they refused rolled back.

Each event is also encoded canonically (`entry`): that byte string is what the Merkle log hashes, so an
event's meaning is fixed the moment it is recorded.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from uuid import UUID

from crypto.merkle import FieldValue, decode_fields, encode_fields
from service.domain.principal import Principal, is_plain_text
from service.store.audit import AuditStore, OutboxRow
from service.store.db import Database, Tx

ENTRY_FORMAT = "bedside-audit/1"
SYSTEM_ACTOR = "Device/bedside"  # the actor of background work: deliveries, holds, automatic disabling


class AuditAction(StrEnum):
    """Every kind of event, as `subject:action`. Never free text."""

    AUTH_DENIED = "auth:denied"
    ACCESS_DENIED = "access:denied"
    TENANT_CREATE = "tenant:create"
    ISSUER_ADD = "issuer:add"
    ISSUER_LIST = "issuer:list"
    ISSUER_REVOKE = "issuer:revoke"
    ISSUER_ROLES = "issuer:roles"
    KEY_STATUS = "key:status"
    KEY_ROTATE = "key:rotate"
    KEY_REWRAP = "key:rewrap"
    KEY_RETIRE = "key:retire"
    KEY_SHRED = "key:shred"
    AUDIT_QUERY = "audit:query"
    AUDIT_EXPORT = "audit:export"
    THREAD_CREATE = "thread:create"
    THREAD_LIST = "thread:list"
    THREAD_READ = "thread:read"
    THREAD_CLOSE = "thread:close"
    MESSAGE_SEND = "message:send"
    MESSAGE_READ = "message:read"
    MESSAGE_RECALL = "message:recall"
    RECEIPT_MARK = "receipt:mark"
    ATTACHMENT_UPLOAD = "attachment:upload"
    ATTACHMENT_READ = "attachment:read"
    BREAK_GLASS_OPEN = "break_glass:open"
    BREAK_GLASS_READ = "break_glass:read"
    BREAK_GLASS_REVIEW = "break_glass:review"
    CONSENT_GRANT = "consent:grant"
    CONSENT_REVOKE = "consent:revoke"
    CONSENT_READ = "consent:read"
    CARE_TEAM_CREATE = "care_team:create"
    CARE_TEAM_READ = "care_team:read"
    CARE_TEAM_JOIN = "care_team:join"
    CARE_TEAM_LEAVE = "care_team:leave"
    WEBHOOK_REGISTER = "webhook:register"
    WEBHOOK_READ = "webhook:read"
    WEBHOOK_UPDATE = "webhook:update"
    WEBHOOK_DELETE = "webhook:delete"
    WEBHOOK_ROTATE = "webhook:rotate"
    WEBHOOK_ENABLE = "webhook:enable"
    WEBHOOK_DISABLE = "webhook:disable"
    WEBHOOK_RESEND = "webhook:resend"
    WEBHOOK_RECOVER = "webhook:recover"
    WEBHOOK_DELIVER = "webhook:deliver"
    WEBHOOK_HOLD = "webhook:hold"
    WEBHOOK_DEAD_LETTER = "webhook:dead_letter"


class Outcome(StrEnum):
    SUCCESS = "success"
    DENIED = "denied"
    FAILURE = "failure"


# Details hold identifiers and codes only: short values of these shapes, nothing a person wrote.
_DETAIL_KEY = re.compile(r"^[a-z][a-z0-9_]{0,40}$")
_MAX_DETAIL_TEXT = 200
DetailValue = str | int | bool | None | Sequence[str]


@dataclass(frozen=True, slots=True)
class RequestMeta:
    """Where the request came from: bound per request by the middleware, per run by the CLI.
    `request_id` is always one the service made; `client_request_id` is the caller's own X-Request-Id
    (an identifier of a fixed form), recorded beside it as the detail of that name, never instead."""

    request_id: str
    source: str | None
    client_request_id: str | None = None


# Request-scoped (each aiohttp request runs in its own task, each with its own context).
REQUEST_META: ContextVar[RequestMeta | None] = ContextVar("bedside_request_meta", default=None)


@dataclass(frozen=True, slots=True)
class AuditEvent:
    action: AuditAction
    outcome: Outcome = Outcome.SUCCESS
    tenant_id: UUID | None = None
    actor: str | None = None
    actor_role: str | None = None
    issuer: str | None = None
    act_for: str | None = None
    patient: str | None = None
    resource_type: str | None = None
    resource_id: str | None = None
    purpose: str | None = None
    details: Mapping[str, DetailValue] = field(default_factory=dict)
    # The `jti` of the token the actor presented: which credential did this, so the events of one leaked
    # or stolen token can be found. In the signed entry only (see `encode_entry`), not an outbox column.
    token_id: str | None = None
    # The `kid` of the issuer key that verified the actor's token (of the endpoint secret, for a signed
    # webhook reply): the events of a key that leaked, or that someone added under the portal's issuer
    # name, can be told from the portal's own. In the signed entry only, as `token_id`.
    key_id: str | None = None

    @classmethod
    def by(cls, principal: Principal, action: AuditAction, **fields: object) -> AuditEvent:
        """An event whose actor is `principal`."""
        return cls(
            action=action,
            tenant_id=principal.tenant_id,
            actor=principal.subject,
            actor_role=principal.role.value,
            issuer=principal.issuer,
            act_for=principal.act_for,
            token_id=principal.token_id,
            key_id=principal.key_id,
            **fields,  # type: ignore[arg-type]
        )

    @classmethod
    def by_operator(cls, action: AuditAction, **fields: object) -> AuditEvent:
        """An event of the operator's `bedside` command line (no token: the host's own access)."""
        return cls(action=action, actor_role="operator", **fields)  # type: ignore[arg-type]

    @classmethod
    def by_principal_or_operator(
        cls, by: Principal | None, action: AuditAction, tenant_id: UUID, **fields: object
    ) -> AuditEvent:
        """The event of a change an admin made through the API (`by`), or the operator through the
        command line (None), in `tenant_id`."""
        if by is not None:
            return cls.by(by, action, **fields)
        return cls.by_operator(action, tenant_id=tenant_id, **fields)

    @classmethod
    def by_system(cls, action: AuditAction, tenant_id: UUID, **fields: object) -> AuditEvent:
        """An event of Bedside's own background work (the webhook worker), within a tenant."""
        return cls(action=action, tenant_id=tenant_id, actor=SYSTEM_ACTOR, actor_role="system", **fields)  # type: ignore[arg-type]

    def denied(self, reason: str) -> AuditEvent:
        return replace(self, outcome=Outcome.DENIED, details={**self.details, "reason": reason})

    def failed(self, reason: str) -> AuditEvent:
        """The access was allowed but could not be served (the content is destroyed, or altered)."""
        return replace(self, outcome=Outcome.FAILURE, details={**self.details, "reason": reason})


def canonical_details(details: Mapping[str, DetailValue]) -> str:
    """Details as canonical JSON (sorted keys, no spaces), after checking they are identifiers only."""
    for key, value in details.items():
        if not _DETAIL_KEY.fullmatch(key):
            raise ValueError("audit detail keys are short snake_case names")
        values = value if isinstance(value, list | tuple) else [value]
        for item in values:
            if isinstance(item, str) and len(item) > _MAX_DETAIL_TEXT:
                raise ValueError("audit details hold identifiers, not text")
            if not isinstance(item, str | int | bool | None):
                raise ValueError("audit details hold strings, integers, booleans or lists of strings")
    normalized = {k: list(v) if isinstance(v, tuple) else v for k, v in details.items()}
    return json.dumps(normalized, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


# The event's optional identifier fields, in their canonical order (after action and outcome). Every
# place that copies an event field by field goes through this tuple, so none can miss one.
OPTIONAL_FIELDS = (
    "actor",
    "actor_role",
    "issuer",
    "act_for",
    "patient",
    "resource_type",
    "resource_id",
    "purpose",
    "request_id",
    "source",
)


def optional_fields(row: OutboxRow) -> dict[str, str | None]:
    """The optional identifier fields of an event, by name."""
    return {name: getattr(row, name) for name in OPTIONAL_FIELDS}


def format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def encode_entry(row: OutboxRow, token_id: str | None = None, key_id: str | None = None) -> bytes:
    """The canonical bytes of one event: what its Merkle leaf hashes.

    `token_id` (the actor's token's `jti`) and then `key_id` (the kid of the key that verified the
    token) join the actor's fields, right after `act_for`, each only when there is one. An event without
    them encodes exactly as every event did before they existed, so leaves written then keep their hashes
    and verify as they always did; the encoding is named fields, so a reader finds them by name, and an
    entry without them simply has none."""
    actor_fields: list[tuple[str, FieldValue]] = list(optional_fields(row).items())
    at = [name for name, _ in actor_fields].index("act_for") + 1
    credential = [(name, value) for name, value in (("token_id", token_id), ("key_id", key_id)) if value is not None]
    actor_fields[at:at] = credential
    fields: list[tuple[str, FieldValue]] = [
        ("format", ENTRY_FORMAT),
        ("event_id", str(row.event_id)),
        ("occurred_at", format_time(row.occurred_at)),
        ("tenant_id", None if row.tenant_id is None else str(row.tenant_id)),
        ("action", row.action),
        ("outcome", row.outcome),
        *actor_fields,
        ("details", row.details),
    ]
    return encode_fields(fields)


def decode_entry(entry: bytes) -> dict[str, FieldValue]:
    """The fields of a canonical entry; raises ValueError for anything that is not one."""
    fields = dict(decode_fields(entry))
    if fields.get("format") != ENTRY_FORMAT:
        raise ValueError("not a bedside audit entry")
    return fields


def _text_field(entry: bytes, name: str) -> str | None:
    try:
        value = decode_entry(entry).get(name)
    except ValueError:  # crypto.merkle.EncodingError is one
        return None
    return value if isinstance(value, str) else None


def token_id_of(entry: bytes) -> str | None:
    """The actor's token id a canonical entry records (None: none, or not an entry)."""
    return _text_field(entry, "token_id")


def key_id_of(entry: bytes) -> str | None:
    """The kid of the key that verified the actor's token, as a canonical entry records it (None: none,
    or not an entry)."""
    return _text_field(entry, "key_id")


MAX_IDENTIFIER = 200


def _identifier(value: str | None) -> str | None:
    """An identifier fit for the log: printable, valid UTF-8, at most 200 characters; anything else
    (a NUL, a lone surrogate, a novel in a path segment) becomes a marker rather than breaking the log's
    indexes or carrying text into it."""
    if value is None:
        return None
    if not is_plain_text(value, MAX_IDENTIFIER):
        return "<invalid>"
    return value


def _bounded(event: AuditEvent) -> AuditEvent:
    return replace(
        event,
        actor=_identifier(event.actor),
        actor_role=_identifier(event.actor_role),
        issuer=_identifier(event.issuer),
        act_for=_identifier(event.act_for),
        patient=_identifier(event.patient),
        resource_type=_identifier(event.resource_type),
        resource_id=_identifier(event.resource_id),
        purpose=_identifier(event.purpose),
        token_id=_identifier(event.token_id),
        key_id=_identifier(event.key_id),
    )


def _with_client_request_id(details: Mapping[str, DetailValue], meta: RequestMeta | None) -> Mapping[str, DetailValue]:
    """The event's details, plus the caller's own request id when it sent one. A detail, not a field of
    its own: details are hashed into the entry already, so older entries encode and verify unchanged."""
    if meta is None or meta.client_request_id is None:
        return details
    return {**details, "client_request_id": meta.client_request_id}


class AuditRecorder:
    def __init__(
        self, store: AuditStore, db: Database, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        self._store = store
        self._db = db
        self._clock = clock

    def row(self, event: AuditEvent) -> OutboxRow:
        """The outbox row `record` would insert, for a store that writes it within a larger statement."""
        return self._row(event)

    def _row(self, event: AuditEvent, meta: RequestMeta | None = None) -> OutboxRow:
        event = _bounded(event)
        meta = meta or REQUEST_META.get()
        row = OutboxRow(
            event_id=uuid.uuid4(),
            occurred_at=self._clock(),
            tenant_id=event.tenant_id,
            action=event.action.value,
            outcome=event.outcome.value,
            actor=event.actor,
            actor_role=event.actor_role,
            issuer=event.issuer,
            act_for=event.act_for,
            patient=event.patient,
            resource_type=event.resource_type,
            resource_id=event.resource_id,
            purpose=event.purpose,
            request_id=meta.request_id if meta else None,
            source=meta.source if meta else None,
            details=canonical_details(_with_client_request_id(event.details, meta)),
            entry=b"",
        )
        return replace(row, entry=encode_entry(row, event.token_id, event.key_id))

    async def record(self, tx: Tx, event: AuditEvent, *, meta: RequestMeta | None = None) -> UUID:
        """Record `event` in the caller's transaction: it commits with the work, or neither does. `meta`:
        where it came from, when that is not the current request's (`REQUEST_META`)."""
        row = self._row(event, meta)
        await self._store.append(tx, row)
        return row.event_id

    async def record_alone(self, event: AuditEvent, *, meta: RequestMeta | None = None) -> UUID:
        """Record `event` in its own transaction (a denial: the work it refused did not happen)."""
        async with self._db.transaction(event.tenant_id) as tx:
            return await self.record(tx, event, meta=meta)
