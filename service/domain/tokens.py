"""Checking a compact JWS (a JWT) against the keys an issuer registered: shared by bearer tokens
(`domain/auth.py`) and by the endorsements that let a tenant admin add a key to an issuer
(`domain/issuers.py`), so that both refuse the same things the same way.

The algorithm comes from the registered key, never from the token, so `alg: none` and HS256 keyed with a
public key cannot pass. Every refusal is a `TokenRefusedError` with a fixed reason code for the audit log, and
the kid of the key that verified the signature when one did (the claims were wrong, or the key is revoked).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jwt

from crypto.issuer_keys import ALLOWED_ALGORITHMS
from service.store.issuers import IssuerKeyRecord


class TokenRefusedError(Exception):
    """The token is not acceptable. `reason` is a fixed code; `key_id` the kid of the key that verified its
    signature, when one did."""

    def __init__(self, reason: str, key_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.key_id = key_id


def unverified_parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header and claims of a compact JWS, unverified (to find the issuer and its keys), refusing an
    algorithm outside the allow-list before any key is looked up."""
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
    except (jwt.PyJWTError, ValueError):  # ValueError: text that is not ASCII, a lone surrogate
        raise TokenRefusedError("malformed") from None
    if header.get("alg") not in ALLOWED_ALGORITHMS:
        raise TokenRefusedError("algorithm-not-allowed")
    return header, claims


class SignatureChecker:
    """Verifies a token's signature with an issuer's registered keys and its standard claims (`iss`, `aud`,
    `exp`, `nbf`, `iat`, within `leeway_seconds`). Registered keys are parsed once per process."""

    def __init__(self, *, audience: str, leeway_seconds: int) -> None:
        self._audience = audience
        self._leeway = leeway_seconds
        self._prepared: dict[tuple[str, str], Any] = {}

    @property
    def leeway(self) -> int:
        return self._leeway

    def verify(
        self,
        token: str,
        *,
        issuer: str,
        algorithm: str,
        kid: object,
        active: Sequence[IssuerKeyRecord],
        revoked: Sequence[IssuerKeyRecord],
        required: Sequence[str],
    ) -> tuple[dict[str, Any], IssuerKeyRecord]:
        """The token's claims and the active key that verified them. `kid` None tries every active key of
        the algorithm. A failure after a key verified the signature names that key; so does "revoked-key",
        a token a revoked key signed."""
        candidates = [k for k in active if k.algorithm == algorithm and (kid is None or k.kid == kid)]
        if not candidates:
            named = [k for k in revoked if k.algorithm == algorithm and k.kid == kid]
            if named and self.signed_by(token, named[0]):
                raise TokenRefusedError("revoked-key", key_id=named[0].kid)
            raise TokenRefusedError("unknown-key" if not named else "bad-signature")
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
                    options={"require": list(required), "verify_iat": True, "verify_nbf": True},
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
            raise TokenRefusedError(failure, key_id=key.kid)
        raise TokenRefusedError(failure)

    def signed_by(self, token: str, key: IssuerKeyRecord) -> bool:
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
