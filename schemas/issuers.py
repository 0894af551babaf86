"""Admin API for the JWT issuers (EHR portals) a tenant trusts."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from schemas.common import StrictBody

RoleName = Literal["patient", "proxy", "physician", "staff", "compliance", "admin"]

# A compact JWS: three base64url segments (the signature's may not be empty: `alg: none` has no place here).
_COMPACT_JWS = r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$"


class IssuerKeyBody(StrictBody):
    issuer: str = Field(min_length=1, max_length=300, description="The tokens' `iss`")
    public_key_pem: str = Field(
        min_length=1, max_length=16384, description="PEM public key: Ed25519, P-256 or RSA >= 2048 bits"
    )
    kid: str | None = Field(default=None, min_length=1, max_length=200, description="Default: key fingerprint")
    roles: list[RoleName] | None = Field(
        default=None,
        min_length=1,
        max_length=6,
        description="A new issuer only: the roles its tokens may claim, within those the operator lets tenant "
        "admins give (BEDSIDE_ADMIN_ISSUER_ROLES, the default). Refused (403) for an existing issuer",
    )
    endorsement: str | None = Field(
        default=None,
        min_length=1,
        max_length=8192,
        pattern=_COMPACT_JWS,
        description="Required for an existing issuer: a JWS signed by one of its active keys (header `kid`), "
        "claims `iss` (the issuer), `tid` (the tenant), `aud` (the service's audience), "
        "`purpose: issuer-key-endorsement`, `key` (the new key's SHA-256 fingerprint, its default kid), `iat` "
        "and `exp` at most 10 minutes apart",
    )


class IssuerKeyOut(BaseModel):
    issuer: str
    kid: str
    algorithm: str
    revoked_at: datetime | None = Field(
        default=None, description="When the key was revoked (its tokens are refused since); null: trusted"
    )
    roles: list[RoleName] = Field(description="The roles the issuer's tokens may claim (any other is refused)")
    registered_by: Literal["operator", "admin"] = Field(
        description="Who registered the issuer: the operator (`bedside issuer add`) or a tenant admin (this API)"
    )


class IssuerKeyListOut(BaseModel):
    items: list[IssuerKeyOut]


class IssuerKeyRevokeBody(StrictBody):
    # In the body, not the path: issuers are URLs, whose slashes a path segment would have to escape.
    issuer: str = Field(min_length=1, max_length=300, description="The tokens' `iss`")
    kid: str = Field(min_length=1, max_length=200, description="The key to revoke")


class IssuerKeyRevokedOut(BaseModel):
    issuer: str
    kid: str
    algorithm: str
    revoked_at: datetime = Field(description="When the key was revoked (by the first request, if it already was)")
    active_keys: int = Field(
        description="Keys of this issuer still trusted; 0: the issuer authenticates nobody until a key is added"
    )
