"""Bearer-token authentication: per-tenant issuers, asymmetric algorithms only, strict claims.

A token is checked against the keys its tenant (`tid`) registered for its issuer (`iss`) (see
`domain/tokens.py`), and its role against the roles that issuer may authenticate. The algorithm comes from
the registered key, never from the token, so `alg: none` and HS256-keyed-with-a-public-key cannot pass.
Every failure is an `AuthenticationError` whose `reason` is a fixed code for the audit log.
The principal names the key that verified the token (`key_id`), and so does every audit event it makes.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from service.domain.issuers import IssuerService, TrustedKeys
from service.domain.principal import SUBJECT_TYPE, Principal, Role, is_plain_text, is_reference
from service.domain.tokens import TokenRefusedError, unverified_parts
from service.errors import AuthenticationError
from service.settings import is_slug

_BEARER = re.compile(r"^Bearer +([A-Za-z0-9\-._~+/]+=*) *$", re.IGNORECASE)
MAX_TOKEN_LENGTH = 8192
_REQUIRED = ["iss", "sub", "aud", "exp", "iat", "tid", "role"]
_ROLES = frozenset(role.value for role in Role)


class Authenticator:
    def __init__(
        self,
        issuers: IssuerService,
        *,
        max_lifetime_seconds: int = 3600,
        verified_cache_seconds: float = 30.0,
        verified_cache_entries: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._issuers = issuers
        self._max_lifetime = max_lifetime_seconds
        self._clock = clock
        # The issuer service's checker: one audience and skew for tokens and endorsements, each key parsed once.
        self._signatures = issuers.signatures
        # Tokens already verified, by their SHA-256: reused until they expire or for `verified_cache_seconds`,
        # and each time only if the issuer-key cache still trusts the key that verified it, so a revoked key's
        # tokens stop working when its keys do: at once in this process, within the issuer-key cache's
        # lifetime in the others. Failures are never cached.
        self._verified: OrderedDict[bytes, tuple[float, Principal]] = OrderedDict()
        self._verified_ttl = verified_cache_seconds
        self._verified_max = verified_cache_entries

    async def authenticate(self, authorization: str | None) -> Principal:
        """The principal a valid `Authorization: Bearer` header proves, or AuthenticationError."""
        if not authorization:
            raise AuthenticationError("missing", "A bearer token is required")
        match = _BEARER.match(authorization)
        if match is None or len(match.group(1)) > MAX_TOKEN_LENGTH:
            raise AuthenticationError("malformed")
        token = match.group(1)
        digest = hashlib.sha256(token.encode()).digest()
        cached = self._verified.get(digest)
        if cached is not None:
            if cached[0] > self._clock() and await self._still_trusted(cached[1]):
                return cached[1]
            self._verified.pop(digest, None)  # another request may have dropped it meanwhile
        principal, expires = await self._verify_token(token)
        if self._verified_ttl > 0:
            self._verified[digest] = (min(expires, self._clock() + self._verified_ttl), principal)
            while len(self._verified) > self._verified_max:
                self._verified.popitem(last=False)
        return principal

    async def _still_trusted(self, principal: Principal) -> bool:
        """Whether the key that verified a cached token is still among its issuer's active keys, and its
        role still one the issuer may authenticate."""
        trusted = await self._issuers.trusted_keys(principal.tenant, principal.issuer)
        return (
            trusted.tenant_id == principal.tenant_id
            and trusted.trusts(principal.key_id)
            and principal.role in trusted.roles
        )

    async def _verify_token(self, token: str) -> tuple[Principal, float]:
        try:
            header, unverified = unverified_parts(token)
        except TokenRefusedError as refused:
            raise AuthenticationError(refused.reason) from None
        tenant, issuer = unverified.get("tid"), unverified.get("iss")
        if not isinstance(tenant, str) or not isinstance(issuer, str):
            raise AuthenticationError("missing-claim")
        # Checked before they reach a database query: a slug, and a printable, encodable issuer.
        if not is_slug(tenant) or not is_plain_text(issuer, 300):
            raise AuthenticationError("unknown-issuer")
        trusted = await self._issuers.trusted_keys(tenant, issuer)
        if trusted.tenant_id is None or not (trusted.keys or trusted.revoked):
            raise AuthenticationError("unknown-issuer")
        verified_by: str | None = None
        try:
            claims, key = self._signatures.verify(
                token,
                issuer=issuer,
                algorithm=header["alg"],
                kid=header.get("kid"),
                active=trusted.keys,
                revoked=trusted.revoked,
                required=_REQUIRED,
            )
            verified_by = key.kid
            principal = self._principal(claims, trusted, tenant, issuer, key.kid)
            return principal, float(claims["exp"])
        except (AuthenticationError, TokenRefusedError) as error:
            # The signature's issuer is one this tenant registered: the attempt is the tenant's to review,
            # and where a key of it verified the signature, the denial names that key.
            raise AuthenticationError(
                error.reason, tenant_id=trusted.tenant_id, issuer=issuer, key_id=error.key_id or verified_by
            ) from None

    def _principal(self, claims: dict[str, Any], trusted: TrustedKeys, tenant: str, issuer: str, kid: str) -> Principal:
        if "purpose" in claims:
            # A token made for something else (a key endorsement) is never a login, whatever else it holds.
            raise AuthenticationError("unexpected-purpose")
        now = self._clock()
        issued, expires = claims["iat"], claims["exp"]
        if not isinstance(issued, int | float) or not isinstance(expires, int | float):
            raise AuthenticationError("invalid-claims")
        if issued > now + self._signatures.leeway:
            raise AuthenticationError("not-yet-valid")
        if expires - issued > self._max_lifetime:
            raise AuthenticationError("lifetime-too-long")
        role = claims["role"]
        if not isinstance(role, str) or role not in _ROLES:
            raise AuthenticationError("unknown-role")
        role = Role(role)
        if role not in trusted.roles:
            raise AuthenticationError("role-not-allowed")
        subject = claims["sub"]
        if not is_reference(subject, SUBJECT_TYPE[role]):
            raise AuthenticationError("invalid-subject")
        act_for = claims.get("act_for")
        if role is Role.PROXY:
            if not is_reference(act_for, "Patient"):
                raise AuthenticationError("invalid-act-for")
        elif act_for is not None:
            raise AuthenticationError("invalid-act-for")
        token_id = claims.get("jti")
        assert trusted.tenant_id is not None  # checked before any signature was
        return Principal(
            tenant_id=trusted.tenant_id,
            tenant=tenant,
            subject=subject,
            role=role,
            issuer=issuer,
            act_for=act_for,
            token_id=token_id if isinstance(token_id, str) and len(token_id) <= 200 else None,
            key_id=kid,
        )
