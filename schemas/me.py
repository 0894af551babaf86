"""`GET /v1/me`: who the token says the caller is, so a portal team can check its integration."""

from __future__ import annotations

from pydantic import BaseModel, Field


class MeOut(BaseModel):
    tenant: str = Field(description="The tenant's slug (the token's `tid`)")
    subject: str = Field(description="FHIR-style reference of the caller, e.g. Patient/123")
    role: str
    issuer: str
    act_for: str | None = Field(default=None, description="For a proxy: the patient acted for")
