"""The consent ledger at the HTTP edge."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.common import Instant, StrictBody

ScopeName = Literal["messaging", "proxy", "disclosure", "public_share"]
ReasonCode = Literal["patient-request", "care-ended", "proxy-ended", "entered-in-error", "other"]


class EvidenceBody(StrictBody):
    """How the consent was captured: a portal click-through (with the consent text's version), a scanned
    paper form (by reference), or verbally before a witness."""

    method: Literal["portal", "paper", "verbal"]
    text_version: str | None = Field(default=None, max_length=100)
    document_ref: str | None = Field(default=None, max_length=200)
    witness: str | None = Field(default=None, max_length=100, description="Practitioner/.. for verbal")


class ConsentBody(StrictBody):
    patient: str = Field(max_length=100, description="Patient/..")
    grantee: str = Field(
        max_length=200,
        description="Practitioner/.. or CareTeam/.. (messaging), RelatedPerson/.. (proxy), Organization/.. "
        "(disclosure), or `public` (public_share)",
    )
    scope: ScopeName
    item: str = Field(default="", max_length=200, description="The named item, for disclosure and public_share")
    purpose: str | None = Field(default=None, max_length=40, description="Purpose of use, for disclosure")
    valid_from: Instant | None = None
    valid_until: Instant | None = None
    include_sensitive: bool = Field(default=False, description="Proxy only: may see sensitive threads")
    evidence: EvidenceBody


class RevokeBody(StrictBody):
    reason: ReasonCode
    evidence: EvidenceBody | None = Field(default=None, description="Required when staff revoke")


class ConsentOut(BaseModel):
    id: str
    patient: str
    grantee: str
    scope: str
    item: str
    purpose: str | None
    kind: Literal["grant", "revoke"]
    revokes: str | None
    valid_from: datetime | None
    valid_until: datetime | None
    include_sensitive: bool
    evidence: dict[str, str]
    reason: str | None
    recorded_by: str
    recorded_role: str
    recorded_at: datetime
    version: int
    hash: str = Field(description="hex SHA-256 of the event's canonical encoding, also in its audit event")
    status: Literal["active", "inactive"]


class ConsentHistoryOut(BaseModel):
    patient: str
    as_of: datetime
    in_force: list[ConsentOut]
    history: list[ConsentOut]


class ConsentQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["json", "fhir"] = "json"


class ConsentHistoryQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    as_of: Instant | None = Field(default=None, description="RFC 3339 time with an offset; default: now")
