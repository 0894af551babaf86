"""Public keys of the JWT issuers a tenant trusts, and the development issuer's key pair.

Only asymmetric algorithms are accepted: EdDSA (Ed25519), ES256 (P-256) and RS256 (RSA of 2048 to 16384 bits).
The algorithm is fixed by the key when it is registered, so a token can never choose how it is checked
(no `alg: none`, no HS256 keyed with a public key).
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

ALLOWED_ALGORITHMS = ("EdDSA", "ES256", "RS256")
MIN_RSA_BITS = 2048
# OpenSSL verifies no RSA signature over a larger modulus (OPENSSL_RSA_MAX_MODULUS_BITS): such a key would be
# stored and trusted, yet no token it signs could ever be verified.
MAX_RSA_BITS = 16384


class IssuerKeyError(ValueError):
    """The key is not one Bedside accepts for verifying tokens. The message never quotes the key."""


@dataclass(frozen=True, slots=True)
class IssuerPublicKey:
    """A verified, canonical public key: its algorithm, PEM and a fingerprint usable as a `kid`."""

    algorithm: str
    pem: str
    fingerprint: str

    def __repr__(self) -> str:
        return f"IssuerPublicKey(algorithm={self.algorithm!r}, fingerprint={self.fingerprint!r})"


def load_issuer_public_key(pem: bytes) -> IssuerPublicKey:
    """Parse a PEM public key, decide its algorithm, and return it in canonical SubjectPublicKeyInfo form."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise IssuerKeyError("not a PEM-encoded public key") from None
    if isinstance(key, ed25519.Ed25519PublicKey):
        algorithm = "EdDSA"
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise IssuerKeyError("EC keys must be on P-256 (ES256)")
        algorithm = "ES256"
    elif isinstance(key, rsa.RSAPublicKey):
        if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
            raise IssuerKeyError(f"RSA keys must have {MIN_RSA_BITS} to {MAX_RSA_BITS} bits")
        algorithm = "RS256"
    else:
        raise IssuerKeyError("only Ed25519, P-256 and RSA public keys are accepted")
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    canonical = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
    return IssuerPublicKey(algorithm=algorithm, pem=canonical.decode(), fingerprint=digest)


@dataclass(frozen=True, slots=True)
class IssuerKeyPair:
    """A private signing key (PEM, PKCS#8) with its public half. The private half is never printed."""

    private_pem: bytes
    public: IssuerPublicKey

    def __repr__(self) -> str:
        return f"IssuerKeyPair(public={self.public!r}, private=<redacted>)"


def generate_ed25519_issuer_key() -> IssuerKeyPair:
    """A fresh Ed25519 key pair for the embedded development issuer."""
    private = ed25519.Ed25519PrivateKey.generate()
    return issuer_key_pair_from_private_pem(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )


def issuer_key_pair_from_private_pem(private_pem: bytes) -> IssuerKeyPair:
    """Load a private key (PEM, unencrypted) and derive its public half."""
    try:
        private = serialization.load_pem_private_key(private_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise IssuerKeyError("not a PEM-encoded, unencrypted private key") from None
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return IssuerKeyPair(private_pem=private_pem, public=load_issuer_public_key(public_pem))
