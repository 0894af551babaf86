"""The sizes of RSA issuer key Bedside takes: at least 2048 bits (weaker is forgeable), at most 16384 (OpenSSL
verifies nothing signed with a larger one, so such a key would be trusted yet authenticate nobody)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from crypto.issuer_keys import MAX_RSA_BITS, MIN_RSA_BITS, IssuerKeyError, load_issuer_public_key


def rsa_pem(bits: int) -> bytes:
    """An RSA public key of exactly `bits` bits (its modulus made, not generated: loading checks no primes)."""
    key = rsa.RSAPublicNumbers(65537, (1 << (bits - 1)) + 3).public_key()
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize("bits", [MIN_RSA_BITS, 4096, MAX_RSA_BITS])
def test_rsa_keys_within_the_bounds_are_taken(bits: int) -> None:
    assert load_issuer_public_key(rsa_pem(bits)).algorithm == "RS256"


@pytest.mark.parametrize("bits", [MIN_RSA_BITS - 1, MAX_RSA_BITS + 1, 600_000])
def test_rsa_keys_outside_the_bounds_are_refused_with_the_bounds(bits: int) -> None:
    with pytest.raises(IssuerKeyError, match="RSA keys must have 2048 to 16384 bits"):
        load_issuer_public_key(rsa_pem(bits))
