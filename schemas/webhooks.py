"""Webhook endpoints, deliveries and attempts (admin), and inbound replies, at the HTTP edge."""

from __future__ import annotations

from datetime import datetime
from typing import Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from schemas.common import Instant, StrictBody

EventType = Literal["message.created", "message.recalled", "thread.created", "consent.revoked"]


class EndpointBody(StrictBody):
    subscriber: str = Field(max_length=100, description="Practitioner/.. or CareTeam/..")
    url: str = Field(
        min_length=1,
        max_length=2048,
        description="https URL; checked at registration and before every delivery (globally routable addresses "
        "only, unless an allow-listed network; http only to loopback when the deployment allows it)",
    )
    event_types: list[EventType] = Field(min_length=1, max_length=4)
    ed25519: bool = Field(default=False, description="Also sign with Ed25519 (v1a); its public key is returned")


class EndpointPatchBody(StrictBody):
    url: str | None = Field(default=None, min_length=1, max_length=2048)
    event_types: list[EventType] | None = Field(default=None, min_length=1, max_length=4)


class RotateBody(StrictBody):
    purpose: Literal["outbound", "inbound", "ed25519"] = Field(
        description="outbound: signs deliveries; inbound: verifies replies; ed25519: the v1a signing key"
    )


class RecoverBody(StrictBody):
    since: Instant
    until: Instant


class EndpointOut(BaseModel):
    id: str
    subscriber: str
    url: str
    event_types: list[str]
    status: Literal["enabled", "disabled"]
    disabled_at: datetime | None
    disabled_reason: Literal["gone", "failing", "admin"] | None
    failing_since: datetime | None
    signing_public_keys: list[str] = Field(description="whpk_ keys that verify the v1a signatures now")
    created_by: str
    created_at: datetime
    updated_at: datetime


class SecretsOut(BaseModel):
    """Shown once: Bedside keeps only sealed copies and never shows them again."""

    outbound_secret: str | None = Field(default=None, description="whsec_: verify Bedside's v1 signatures")
    inbound_secret: str | None = Field(default=None, description="whsec_: sign replies to /v1/inbound/{id}/replies")
    signing_public_key: str | None = Field(default=None, description="whpk_: verify Bedside's v1a signatures")


class EndpointCreatedOut(BaseModel):
    endpoint: EndpointOut
    secrets: SecretsOut


class EndpointListOut(BaseModel):
    items: list[EndpointOut]
    next_cursor: str | None


class EndpointEnabledOut(BaseModel):
    endpoint: EndpointOut
    released: int = Field(description="Deliveries held while it was disabled, now due")


class AttemptOut(BaseModel):
    attempt: int
    attempted_at: datetime
    duration_ms: int
    status_code: int | None
    error_class: str | None


class DeliveryOut(BaseModel):
    id: str
    webhook_id: str
    endpoint_id: str
    event_type: str
    data: dict[str, str | int]
    created_at: datetime
    status: Literal["pending", "succeeded", "held", "dead"]
    held_reason: str | None
    in_flight: bool
    attempts: int
    next_attempt_at: datetime | None
    last_attempt_at: datetime | None
    last_status_code: int | None
    delivered_at: datetime | None
    attempt_log: list[AttemptOut] | None = Field(default=None, description="Every attempt (one delivery's view)")


class DeliveryListOut(BaseModel):
    items: list[DeliveryOut]
    next_cursor: str | None


class DeliveryQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: Literal["pending", "succeeded", "held", "dead"] | None = None
    limit: int = Field(default=50, ge=1, le=200)
    cursor: str | None = Field(default=None, max_length=100, description="next_cursor of the previous page")


class EndpointQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    subscriber: str | None = Field(default=None, max_length=100, description="only this Practitioner/.. or CareTeam/..")
    limit: int = Field(default=50, ge=1, le=200)
    cursor: str | None = Field(default=None, max_length=100, description="next_cursor of the previous page")


class RecoveredOut(BaseModel):
    recovered: int


class InboundReplyBody(StrictBody):
    thread_id: UUID
    in_reply_to: UUID | None = None
    body: str = Field(min_length=1, max_length=65536, description="Text, up to 64 KiB in UTF-8")
    sender: str = Field(max_length=100, description="Practitioner/..: the endpoint's, or a member of its care team")


class InboundReplyOut(BaseModel):
    thread_id: str
    message_id: str
    seq: int | None = Field(description="The message's sequence number (null when this repeats a reply)")
    replayed: bool
