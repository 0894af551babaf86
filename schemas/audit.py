"""The compliance officer's view of the audit log, and the proofs anyone can check."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.common import MAX_INDEX, Instant


class AuditEventQuery(BaseModel):
    """Filters of `GET /v1/audit/events` and `/v1/audit/export` (query string)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    patient: str | None = Field(default=None, max_length=100, description="Patient/.. the event concerns")
    actor: str | None = Field(default=None, max_length=100, description="who acted (FHIR reference)")
    action: str | None = Field(default=None, max_length=60, description="subject:action code, e.g. key:shred")
    outcome: Literal["success", "denied", "failure"] | None = None
    resource_type: str | None = Field(default=None, max_length=60, description="type of the resource acted on")
    resource_id: str | None = Field(default=None, max_length=200, description="id of the resource acted on")
    since: Instant | None = Field(default=None, description="inclusive")
    until: Instant | None = Field(default=None, description="exclusive")
    order: Literal["newest", "oldest"] = "newest"
    limit: int = Field(default=100, ge=1, le=500)
    cursor: str | None = Field(default=None, max_length=100, description="next_cursor of the previous page")


class AuditExportQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["ndjson", "fhir"] = "ndjson"
    patient: str | None = Field(default=None, max_length=100, description="Patient/.. the event concerns")
    actor: str | None = Field(default=None, max_length=100, description="who acted (FHIR reference)")
    action: str | None = Field(default=None, max_length=60, description="subject:action code, e.g. key:shred")
    outcome: Literal["success", "denied", "failure"] | None = None
    resource_type: str | None = Field(default=None, max_length=60, description="type of the resource acted on")
    resource_id: str | None = Field(default=None, max_length=200, description="id of the resource acted on")
    since: Instant | None = Field(default=None, description="inclusive")
    until: Instant | None = Field(default=None, description="exclusive")


class AuditEventOut(BaseModel):
    seq: int = Field(description="Position in the Merkle log (dense, from 0)")
    leaf_hash: str = Field(description="hex SHA-256(0x00 || entry)")
    entry: str = Field(description="base64 of the canonical entry the leaf hashes")
    event_id: str
    occurred_at: datetime
    action: str
    outcome: str
    actor: str | None
    actor_role: str | None
    issuer: str | None
    act_for: str | None
    token_id: str | None = Field(
        default=None, description="The `jti` of the actor's token, as the signed entry records it (not a filter)"
    )
    key_id: str | None = Field(
        default=None,
        description="The `kid` of the issuer key that verified the actor's token, as the signed entry records it "
        "(not a filter)",
    )
    patient: str | None
    resource_type: str | None
    resource_id: str | None
    purpose: str | None
    request_id: str | None
    source: str | None
    details: dict[str, Any]


class AuditEventListOut(BaseModel):
    items: list[AuditEventOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; absent on the last")


class CheckpointOut(BaseModel):
    size: int
    root: str = Field(description="hex root hash of the tree of `size` leaves")
    signed_at: datetime
    note: str = Field(description="The C2SP signed note (tlog-checkpoint), Ed25519")
    vkey: str = Field(description="The log's public key in note verifier-key form")


class InclusionProofQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int = Field(ge=0, le=MAX_INDEX, description="leaf index, below size")
    size: int = Field(ge=1, le=MAX_INDEX, description="tree size, at most the log's")


class InclusionProofOut(BaseModel):
    index: int
    size: int
    leaf_hash: str
    proof: list[str] = Field(description="RFC 9162 inclusion path, hex, from the leaf upwards")


class ConsistencyProofQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    from_: int = Field(ge=1, le=MAX_INDEX, alias="from", description="older tree size")
    to: int = Field(ge=1, le=MAX_INDEX, description="newer tree size, at most the log's")


class ConsistencyProofOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    from_: int = Field(alias="from")
    to: int
    proof: list[str] = Field(description="RFC 9162 consistency proof, hex")


class LeafHashesQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    start: int = Field(ge=0, le=MAX_INDEX, description="first index")
    end: int = Field(ge=1, le=MAX_INDEX, description="index after the last")


class LeafHashOut(BaseModel):
    index: int
    leaf_hash: str


class LeafHashesOut(BaseModel):
    items: list[LeafHashOut]
