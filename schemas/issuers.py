"""Admin API for the JWT issuers (EHR portals) a tenant trusts."""

from __future__ import annotations

from pydantic import BaseModel, Field

from schemas.common import StrictBody


class IssuerKeyBody(StrictBody):
    issuer: str = Field(min_length=1, max_length=300, description="The tokens' `iss`")
    public_key_pem: str = Field(
        min_length=1, max_length=16384, description="PEM public key: Ed25519, P-256 or RSA >= 2048 bits"
    )
    kid: str | None = Field(default=None, min_length=1, max_length=200, description="Default: key fingerprint")


class IssuerKeyOut(BaseModel):
    issuer: str
    kid: str
    algorithm: str


class IssuerKeyListOut(BaseModel):
    items: list[IssuerKeyOut]
