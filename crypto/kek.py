"""Key-encryption-key (KEK) providers: the interface, the wrapped-key value and the canonical wrap AAD.

A provider holds one KEK identity (`kek_id`) in several versions. `wrap` always uses the primary (newest)
version; `unwrap` accepts any version that is not retired. Rotation is `add_version()` (the new version
becomes primary), then rewrapping the stored wraps (`data_key_wraps` rows) with `unwrap` + `wrap`, then
`retire_version(old)`, which destroys that version's key material for good.

Calls are synchronous and may block (file or token I/O): run them off the event loop. Implementations:
`crypto.kek_file.LocalKeyFileProvider` (the embedded default) and
`crypto.kek_pkcs11.Pkcs11KekProvider` (SoftHSM2 in tests, an HSM in production).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol
from uuid import UUID

from crypto import _format
from crypto.keys import DEK_BYTES

__all__ = ["KekProvider", "WrappedKey", "dek_wrap_aad"]

_WRAP_AAD_LABEL = b"bedside.dek-wrap"
_KEK_AAD_LABEL = b"bedside.kek"


@dataclass(frozen=True, slots=True)
class WrappedKey:
    """A DEK encrypted under one KEK version: what a `data_key_wraps` row stores."""

    kek_id: str
    kek_version: int
    wrapped: bytes = field(repr=False)


class KekProvider(Protocol):
    """What the service needs from a KEK provider. Blocking; not for the event loop thread."""

    @property
    def kek_id(self) -> str:
        """The identity of this provider's KEK, stored with each wrap."""
        ...

    @property
    def primary_version(self) -> int:
        """The version `wrap` uses: the newest one."""
        ...

    def versions(self) -> tuple[int, ...]:
        """The versions that can still unwrap (not retired), ascending."""
        ...

    def wrap(self, dek_secret: bytes, aad: bytes) -> WrappedKey:
        """Encrypt a 32-byte DEK secret under the primary version, bound to `aad` (see dek_wrap_aad)."""
        ...

    def unwrap(self, wrapped: WrappedKey, aad: bytes) -> bytes:
        """Return the DEK secret; `DecryptionError` if the wrap or `aad` do not match.

        Raises `KekVersionUnavailableError` if the wrap names an unknown or retired KEK version.
        """
        ...

    def add_version(self) -> int:
        """Create a new KEK version, make it primary, and return its number."""
        ...

    def retire_version(self, version: int) -> None:
        """Destroy a non-primary version for good: wraps under it can no longer be unwrapped."""
        ...


def dek_wrap_aad(*, dek_id: UUID, dek_version: int, tenant: str, patient: str) -> bytes:
    """The canonical AAD that binds a wrap to its DEK and owner.

    `"bedside.dek-wrap" || 0x01 || dek_id(16) || u32(dek_version) || lp(tenant) || lp(patient)`, where
    `lp(s) = u32(len(utf8(s))) || utf8(s)`. A wrap made for one patient does not unwrap for another.
    """
    if not isinstance(dek_id, UUID):
        raise TypeError("dek_id must be a uuid.UUID")
    return (
        _WRAP_AAD_LABEL
        + bytes((1,))
        + dek_id.bytes
        + _format.u32(dek_version)
        + _format.text_field(tenant, "tenant")
        + _format.text_field(patient, "patient")
    )


def kek_gcm_aad(kek_id: str, kek_version: int, aad: bytes) -> bytes:
    """The AES-GCM AAD a provider uses: binds its own KEK identity and version to the caller's AAD."""
    if not isinstance(aad, bytes):
        raise TypeError("aad must be bytes")
    return _KEK_AAD_LABEL + _format.text_field(kek_id, "kek_id") + _format.u32(kek_version) + aad


def check_dek_secret(dek_secret: bytes) -> None:
    """Providers wrap exactly the 32-byte DEK secrets that `crypto.keys.DataKey` holds."""
    if not isinstance(dek_secret, bytes) or len(dek_secret) != DEK_BYTES:
        raise ValueError(f"dek_secret must be {DEK_BYTES} bytes")
