"""Bearer-token authentication: per-tenant issuers, asymmetric algorithms only, strict claims.

A token is checked against the keys its tenant (`tid`) registered for its issuer (`iss`). The algorithm
comes from the registered key, never from the token, so `alg: none` and HS256-keyed-with-a-public-key
cannot pass. Every failure is an `AuthenticationError` whose `reason` is a fixed code for the audit log.
The principal names the key that verified the token (`key_id`), and so does every audit event it makes.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import jwt

from crypto.issuer_keys import ALLOWED_ALGORITHMS
from service.domain.issuers import IssuerService, TrustedKeys
from service.domain.principal import SUBJECT_TYPE, Principal, Role, is_plain_text, is_reference
from service.errors import AuthenticationError
from service.settings import is_slug
from service.store.issuers import IssuerKeyRecord

_BEARER = re.compile(r"^Bearer +([A-Za-z0-9\-._~+/]+=*) *$", re.IGNORECASE)
MAX_TOKEN_LENGTH = 8192
_REQUIRED = ["iss", "sub", "aud", "exp", "iat", "tid", "role"]
_ROLES = frozenset(role.value for role in Role)


class Authenticator:
    def __init__(
        self,
        issuers: IssuerService,
        *,
        audience: str,
        leeway_seconds: int = 60,
        max_lifetime_seconds: int = 3600,
        verified_cache_seconds: float = 30.0,
        verified_cache_entries: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._issuers = issuers
        self._audience = audience
        self._leeway = leeway_seconds
        self._max_lifetime = max_lifetime_seconds
        self._clock = clock
        self._prepared: dict[tuple[str, str], Any] = {}
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
        """Whether the key that verified a cached token is still among its issuer's active keys."""
        trusted = await self._issuers.trusted_keys(principal.tenant, principal.issuer)
        return trusted.tenant_id == principal.tenant_id and trusted.trusts(principal.key_id)

    async def _verify_token(self, token: str) -> tuple[Principal, float]:
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise AuthenticationError("malformed") from None
        algorithm = header.get("alg")
        if algorithm not in ALLOWED_ALGORITHMS:
            raise AuthenticationError("algorithm-not-allowed")
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
            claims, key = self._verify(token, issuer, algorithm, header.get("kid"), trusted)
            verified_by = key.kid
            return self._principal(claims, trusted.tenant_id, tenant, issuer, key.kid), float(claims["exp"])
        except AuthenticationError as error:
            # The signature's issuer is one this tenant registered: the attempt is the tenant's to review,
            # and where a key of it verified the signature, the denial names that key.
            raise AuthenticationError(
                error.reason, tenant_id=trusted.tenant_id, issuer=issuer, key_id=error.key_id or verified_by
            ) from None

    def _verify(
        self, token: str, issuer: str, algorithm: str, kid: object, trusted: TrustedKeys
    ) -> tuple[dict[str, Any], IssuerKeyRecord]:
        """The token's claims and the active key that verified them. A failure after a key verified the
        signature names that key (`key_id`); so does "revoked-key", a token a revoked key signed."""
        candidates = [k for k in trusted.keys if k.algorithm == algorithm and (kid is None or k.kid == kid)]
        if not candidates:
            revoked = [k for k in trusted.revoked if k.algorithm == algorithm and k.kid == kid]
            if revoked and self._signed_by(token, revoked[0]):
                raise AuthenticationError("revoked-key", key_id=revoked[0].kid)
            raise AuthenticationError("unknown-key" if not revoked else "bad-signature")
        failure = "bad-signature"
        for key in candidates:
            try:
                claims = jwt.decode(
                    token,
                    key=self._prepare(key.algorithm, key.public_key_pem),
                    algorithms=[key.algorithm],
                    audience=self._audience,
                    issuer=issuer,
                    leeway=self._leeway,
                    options={"require": _REQUIRED, "verify_iat": True, "verify_nbf": True},
                )
                return claims, key
            except jwt.InvalidSignatureError:
                continue
            except jwt.ExpiredSignatureError:
                failure = "expired"
            except jwt.ImmatureSignatureError:
                failure = "not-yet-valid"
            except jwt.InvalidAudienceError:
                failure = "wrong-audience"
            except jwt.InvalidIssuerError:
                failure = "wrong-issuer"
            except jwt.MissingRequiredClaimError:
                failure = "missing-claim"
            except jwt.DecodeError:
                failure = "malformed"
            except jwt.PyJWTError:
                failure = "invalid-claims"
            # The signature checked out (PyJWT verifies it before claims): no other key will do better.
            raise AuthenticationError(failure, key_id=key.kid)
        raise AuthenticationError(failure)

    def _signed_by(self, token: str, key: IssuerKeyRecord) -> bool:
        """Whether `key` made the token's signature (its claims aside)."""
        try:
            jwt.PyJWS().decode(token, key=self._prepare(key.algorithm, key.public_key_pem), algorithms=[key.algorithm])
        except jwt.PyJWTError:
            return False
        return True

    def _prepare(self, algorithm: str, pem: str) -> Any:
        """Parse each registered key once per process, not once per request."""
        cache_key = (algorithm, pem)
        prepared = self._prepared.get(cache_key)
        if prepared is None:
            if len(self._prepared) > 4096:
                self._prepared.clear()
            prepared = jwt.get_algorithm_by_name(algorithm).prepare_key(pem)
            self._prepared[cache_key] = prepared
        return prepared

    def _principal(self, claims: dict[str, Any], tenant_id: Any, tenant: str, issuer: str, kid: str) -> Principal:
        now = self._clock()
        issued, expires = claims["iat"], claims["exp"]
        if not isinstance(issued, int | float) or not isinstance(expires, int | float):
            raise AuthenticationError("invalid-claims")
        if issued > now + self._leeway:
            raise AuthenticationError("not-yet-valid")
        if expires - issued > self._max_lifetime:
            raise AuthenticationError("lifetime-too-long")
        role = claims["role"]
        if not isinstance(role, str) or role not in _ROLES:
            raise AuthenticationError("unknown-role")
        role = Role(role)
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
        return Principal(
            tenant_id=tenant_id,
            tenant=tenant,
            subject=subject,
            role=role,
            issuer=issuer,
            act_for=act_for,
            token_id=token_id if isinstance(token_id, str) and len(token_id) <= 200 else None,
            key_id=kid,
        )
