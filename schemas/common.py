"""Shapes shared by every route: the RFC 9457 problem document."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field

# The largest sequence number or offset a query takes: beyond it PostgreSQL's bigint would overflow.
MAX_INDEX = 2**62


def _in_range(moment: datetime) -> datetime:
    try:
        utc = moment.astimezone(UTC)
    except OverflowError:
        raise ValueError("a time between the years 1900 and 9000") from None
    if not 1900 <= utc.year <= 9000:
        raise ValueError("a time between the years 1900 and 9000")
    return moment


# A timezone-aware time that converts to UTC and stays within reason: RFC 3339 with an offset.
Instant = Annotated[AwareDatetime, AfterValidator(_in_range)]


class StrictBody(BaseModel):
    """Base of request bodies: unknown fields are an error, nothing is coerced silently."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class FieldProblemOut(BaseModel):
    """One failing field: where (`loc`), what kind (`type`), a message. Never the submitted value."""

    loc: list[str | int]
    type: str
    msg: str


class Problem(BaseModel):
    """RFC 9457 problem details, served as `application/problem+json`."""

    model_config = ConfigDict(json_schema_extra={"description": "RFC 9457 problem details"})

    type: str = Field(description="A URI naming the kind of problem, e.g. urn:bedside:problem:not-found")
    title: str
    status: int
    detail: str | None = None
    code: str = Field(description="Stable, machine-readable problem code")
    request_id: str = Field(description="Quote this to support; it finds the request in the logs")
    errors: list[FieldProblemOut] | None = None
    shredded_at: datetime | None = Field(
        default=None, description="For content-shredded (410): when the key was destroyed (the tombstone)"
    )
    recalled_at: datetime | None = Field(
        default=None, description="For content-recalled (410): when the message it was sent with was recalled"
    )
