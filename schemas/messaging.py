"""Threads, messages, receipts, break-glass review and care teams at the HTTP edge."""

from __future__ import annotations

from datetime import datetime
from typing import Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from schemas.common import MAX_INDEX, StrictBody


class FirstMessageBody(StrictBody):
    body: str = Field(min_length=1, max_length=65536)


class ThreadBody(StrictBody):
    patient: str = Field(max_length=100, description="Patient/..")
    participants: list[str] = Field(min_length=1, max_length=20, description="Practitioner/.. and/or CareTeam/..")
    subject: str = Field(min_length=1, max_length=200)
    priority: Literal["routine", "urgent"] = "routine"
    sensitive: bool = False
    message: FirstMessageBody | None = None


class MessageBody(StrictBody):
    body: str = Field(min_length=1, max_length=65536, description="Text, up to 64 KiB in UTF-8")
    attachment_ids: list[UUID] = Field(default_factory=list, max_length=20)
    in_reply_to: UUID | None = None


class ReadBody(StrictBody):
    up_to: int = Field(ge=0, le=MAX_INDEX, description="Sequence number read up to (inclusive)")


class ReceiptOut(BaseModel):
    reader: str
    up_to: int
    read_at: datetime


class MessageOut(BaseModel):
    # Ids are UUIDs here, not pre-formatted strings: pydantic-core writes them (the same text) in one
    # step with the rest of the page, about a quarter less time per page than str() on each first.
    id: UUID
    thread_id: UUID
    seq: int
    sender: str
    sender_role: str
    body: str | None = Field(description="Absent once recalled (a tombstone)")
    in_reply_to: UUID | None
    attachment_ids: list[UUID] = Field(description="Empty once recalled: the recall withdraws them too")
    created_at: datetime
    recalled_at: datetime | None
    recalled_by: str | None


class MessageListOut(BaseModel):
    items: list[MessageOut]


class ThreadOut(BaseModel):
    id: UUID
    patient: str
    participants: list[str]
    subject: str | None = Field(
        description="Absent (null) only in a listing's tombstone of a crypto-shredded patient's thread"
    )
    priority: str
    sensitive: bool
    status: str
    created_by: str
    created_at: datetime
    closed_at: datetime | None
    last_seq: int
    last_activity: datetime
    unread: int = Field(description="The caller's: others' messages after the caller's receipt, recalled ones left out")
    access: Literal["read", "write"] = Field(description="read: a break-glass grant; write: a participant")
    receipts: list[ReceiptOut] | None = Field(
        description="Every participant's read receipt; null in `GET /v1/threads` (read one thread for them)"
    )
    message: MessageOut | None = Field(default=None, description="The first message, when created with one")
    shredded_at: datetime | None = Field(
        default=None,
        description="In a listing: when the patient's key was destroyed (a tombstone: ids and metadata, no subject)",
    )


class ThreadListOut(BaseModel):
    items: list[ThreadOut]
    next_cursor: str | None


class ThreadListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    patient: str | None = Field(default=None, max_length=100, description="only this Patient/..'s threads")
    status: Literal["open", "closed"] | None = None
    unread: bool = Field(default=False, description="true: only threads with unread messages")
    limit: int = Field(default=50, ge=1, le=100)
    cursor: str | None = Field(default=None, max_length=100, description="next_cursor of the previous page")


class MessageListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    after: int | None = Field(default=None, ge=0, le=MAX_INDEX, description="sequence number, exclusive")
    before: int | None = Field(default=None, ge=1, le=MAX_INDEX, description="sequence number, exclusive")
    limit: int = Field(default=50, ge=1, le=200)


class BreakGlassQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    reviewed: bool | None = Field(default=None, description="only reviewed (true) or unreviewed (false) accesses")
    limit: int = Field(default=50, ge=1, le=100)
    cursor: str | None = Field(default=None, max_length=100, description="next_cursor of the previous page")


class BreakGlassOut(BaseModel):
    id: str
    thread_id: str
    physician: str
    reason: str | None = Field(description="Absent (null) in the tombstone of a crypto-shredded patient's grant")
    opened_at: datetime
    expires_at: datetime
    reviewed: bool
    reviewed_at: datetime | None
    reviewed_by: str | None
    shredded_at: datetime | None = Field(
        default=None, description="When the patient's key was destroyed (a tombstone: no reason)"
    )


class BreakGlassListOut(BaseModel):
    items: list[BreakGlassOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page (older grants); null on the last")


class CareTeamBody(StrictBody):
    team: str = Field(max_length=100, description="CareTeam/..")
    members: list[str] = Field(default_factory=list, max_length=200, description="Practitioner/..")


class CareTeamMembersBody(StrictBody):
    members: list[str] = Field(max_length=200)


class MembershipOut(BaseModel):
    member: str
    joined_at: datetime
    left_at: datetime | None


class CareTeamOut(BaseModel):
    team: str
    members: list[str] = Field(description="Current members")
    history: list[MembershipOut]
