"""The exceptions of Bedside's envelope encryption.

No message ever contains key bytes, plaintext or ciphertext. `DecryptionError` is deliberately opaque:
it says that a record, chunk or wrapped key did not open, never which check failed, so it cannot serve as
an oracle. Treat it as an alarm (possible tampering or misfiled data), not as a client error.
"""

from __future__ import annotations


class CryptoError(Exception):
    """Base of every error raised by `crypto` envelope encryption and key providers."""


class DecryptionError(CryptoError):
    """A record, chunk or wrapped key did not open. Always the same message, whatever the cause."""

    def __init__(self) -> None:
        super().__init__("decryption failed")


class KeyProviderError(CryptoError):
    """A key-encryption-key provider cannot do what was asked (unsafe key file, token problem, ...).

    The message names the file, token or version involved and how to fix it, never a key.
    """


class KekVersionUnavailableError(KeyProviderError):
    """The KEK id or version named by a wrapped key is unknown to the provider or has been retired."""
