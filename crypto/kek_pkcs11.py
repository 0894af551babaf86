"""The PKCS#11 KEK provider (python-pkcs11): an HSM in production, SoftHSM2 in tests.

Each KEK version is an AES-256 secret key object generated ON the token, never outside it:
`CKA_TOKEN`, `CKA_PRIVATE`, `CKA_SENSITIVE` true; `CKA_EXTRACTABLE`, `CKA_MODIFIABLE`, `CKA_COPYABLE`
false; `CKA_ENCRYPT` and `CKA_DECRYPT` its only capabilities. Its `CKA_ID` is the KEK id (UTF-8) and its
`CKA_LABEL` is `bedside-kek:<kek id>:<version>`. The token holds the state: the versions are the labels
found, the primary is the highest; retiring a version destroys its object.

A wrap is `nonce(12) || CKM_AES_GCM(kek, nonce, aad, 128-bit tag)(dek_secret)`, computed on the token,
with the AAD binding the KEK id and version to the caller's AAD (see `crypto.kek.dek_wrap_aad`). Random
96-bit nonces are safe far beyond the number of DEKs Bedside will ever wrap under one version.

This is the only module in `crypto` that imports `pkcs11`. One provider per token per process (PKCS#11
login state is per process; a second provider in a process that is already logged in reuses that
login without checking its own PIN): `close()` it (or use it as a context manager) when done. Calls from several
threads are serialized by python-pkcs11's per-session operation lock. Rotation (`add_version`,
`retire_version`) is an administrative act: run it from one process at a time.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from types import TracebackType
from typing import TYPE_CHECKING

import pkcs11
from pkcs11 import Attribute, GCMParams, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11err
from pkcs11.types import DecryptMixin, EncryptMixin, Object, Session

from crypto.errors import DecryptionError, KekVersionUnavailableError, KeyProviderError
from crypto.kek import WrappedKey, check_dek_secret, kek_gcm_aad

if TYPE_CHECKING:
    from crypto.kek import KekProvider

__all__ = ["SOFTHSM2_LIBRARY_CANDIDATES", "Pkcs11KekProvider", "find_softhsm2_library"]

_NONCE_BYTES = 12
_WRAPPED_BYTES = _NONCE_BYTES + 32 + 16
_MAX_VERSION = 2**32 - 1

# Where distributions put SoftHSM2's PKCS#11 module (Debian/Ubuntu, Fedora/RHEL, Alpine, Homebrew).
SOFTHSM2_LIBRARY_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/*-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/lib64/softhsm/libsofthsm2.so",
    "/usr/lib/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
    "/usr/local/opt/softhsm/lib/softhsm/libsofthsm2.so",
)

# What SoftHSM2 and HSMs answer when a GCM tag does not verify (SoftHSM2 says CKR_GENERAL_ERROR).
_TAG_FAILURES = (p11err.EncryptedDataInvalid, p11err.EncryptedDataLenRange, p11err.GeneralError)


def find_softhsm2_library(candidates: Iterable[str] = SOFTHSM2_LIBRARY_CANDIDATES) -> str | None:
    """Return the path of the first existing SoftHSM2 module among `candidates` (globs allowed)."""
    for pattern in candidates:
        for path in sorted(glob.glob(pattern)):
            if os.path.isfile(path):
                return path
    return None


class Pkcs11KekProvider:
    """KEK provider whose keys live, non-extractable, on a PKCS#11 token."""

    __slots__ = ("_kek_id", "_session", "_token_label")

    def __init__(self, *, library_path: str, token_label: str, user_pin: str, kek_id: str = "bedside") -> None:
        """Log in to the token labelled `token_label` and generate KEK version 1 on it if it has none.

        Raises `KeyProviderError` (naming the library or token, never the PIN) if that fails.
        """
        if not kek_id or ":" in kek_id:
            raise ValueError("kek_id must be non-empty and must not contain ':'")
        self._kek_id = kek_id
        self._token_label = token_label
        try:
            token = pkcs11.lib(library_path).get_token(token_label=token_label)
        except (p11err.PKCS11Error, OSError, RuntimeError) as exc:
            raise KeyProviderError(
                f"cannot use PKCS#11 token {token_label!r} via {library_path}: {type(exc).__name__}"
            ) from None
        try:
            self._session: Session = token.open(rw=True, user_pin=user_pin)
        except p11err.UserAlreadyLoggedIn:
            # Login state is per process: another session of ours already logged in.
            self._session = token.open(rw=True)
        except p11err.PKCS11Error as exc:
            raise KeyProviderError(f"cannot log in to PKCS#11 token {token_label!r}: {type(exc).__name__}") from None
        if not self._find_versions():
            self._generate(1)

    def __repr__(self) -> str:
        return f"Pkcs11KekProvider(token_label={self._token_label!r}, kek_id={self._kek_id!r})"

    def __enter__(self) -> Pkcs11KekProvider:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the session (logging out if it is the last one)."""
        self._session.close()

    @property
    def kek_id(self) -> str:
        """The KEK identity: the `CKA_ID` of its key objects."""
        return self._kek_id

    @property
    def primary_version(self) -> int:
        """The highest version on the token; `wrap` uses it."""
        return self._primary(self._find_versions())

    def versions(self) -> tuple[int, ...]:
        """Versions present on the token, ascending (retired ones have been destroyed)."""
        return tuple(sorted(self._find_versions()))

    def wrap(self, dek_secret: bytes, aad: bytes) -> WrappedKey:
        """Encrypt a 32-byte DEK secret on the token under the primary version (AES-GCM, bound to `aad`)."""
        check_dek_secret(dek_secret)
        versions = self._find_versions()
        version = self._primary(versions)
        key = versions[version]
        if not isinstance(key, EncryptMixin):
            raise KeyProviderError(f"PKCS#11 object for KEK version {version} cannot encrypt")
        nonce = os.urandom(_NONCE_BYTES)
        params = GCMParams(nonce, kek_gcm_aad(self._kek_id, version, aad))
        try:
            sealed = key.encrypt(dek_secret, mechanism=Mechanism.AES_GCM, mechanism_param=params)
        except p11err.PKCS11Error as exc:
            raise KeyProviderError(f"PKCS#11 wrap failed: {type(exc).__name__}") from None
        if not isinstance(sealed, bytes):
            raise KeyProviderError("PKCS#11 wrap returned no bytes")
        return WrappedKey(kek_id=self._kek_id, kek_version=version, wrapped=nonce + sealed)

    def unwrap(self, wrapped: WrappedKey, aad: bytes) -> bytes:
        """Decrypt a wrap on the token; `DecryptionError` if it or `aad` were changed.

        Raises `KekVersionUnavailableError` for another KEK id or a version not on the token.
        """
        if wrapped.kek_id != self._kek_id:
            raise KekVersionUnavailableError(f"wrap names KEK {wrapped.kek_id!r}, this provider holds {self._kek_id!r}")
        key = self._find_versions().get(wrapped.kek_version)
        if key is None:
            raise KekVersionUnavailableError(
                f"KEK {self._kek_id!r} version {wrapped.kek_version} is not on the token (retired?)"
            )
        if not isinstance(key, DecryptMixin):
            raise KeyProviderError(f"PKCS#11 object for KEK version {wrapped.kek_version} cannot decrypt")
        blob = wrapped.wrapped
        if not isinstance(blob, bytes) or len(blob) != _WRAPPED_BYTES:
            raise DecryptionError
        params = GCMParams(blob[:_NONCE_BYTES], kek_gcm_aad(self._kek_id, wrapped.kek_version, aad))
        try:
            secret = key.decrypt(blob[_NONCE_BYTES:], mechanism=Mechanism.AES_GCM, mechanism_param=params)
        except _TAG_FAILURES:
            raise DecryptionError from None
        except p11err.PKCS11Error as exc:
            raise KeyProviderError(f"PKCS#11 unwrap failed: {type(exc).__name__}") from None
        if not isinstance(secret, bytes):
            raise KeyProviderError("PKCS#11 unwrap returned no bytes")
        return secret

    def add_version(self) -> int:
        """Generate the next KEK version on the token; it becomes primary. Returns its number."""
        version = max(self._find_versions(), default=0) + 1
        if version > _MAX_VERSION:
            raise KeyProviderError("KEK version numbers are exhausted")
        self._generate(version)
        return version

    def retire_version(self, version: int) -> None:
        """Destroy a non-primary version's key object (idempotent). Irreversible: rewrap first."""
        versions = self._find_versions()
        if version not in versions:
            if 0 < version < max(versions, default=0):
                return  # already retired
            raise KekVersionUnavailableError(f"KEK {self._kek_id!r} has no version {version}")
        if version == max(versions):
            raise KeyProviderError(
                f"refusing to retire primary version {version} of KEK {self._kek_id!r}; add a version first"
            )
        try:
            versions[version].destroy()
        except p11err.PKCS11Error as exc:
            raise KeyProviderError(f"PKCS#11 could not destroy KEK version {version}: {type(exc).__name__}") from None

    def _primary(self, versions: dict[int, Object]) -> int:
        if not versions:
            raise KeyProviderError(f"PKCS#11 token {self._token_label!r} holds no version of KEK {self._kek_id!r}")
        return max(versions)

    def _label(self, version: int) -> str:
        return f"bedside-kek:{self._kek_id}:{version}"

    def _find_versions(self) -> dict[int, Object]:
        prefix = f"bedside-kek:{self._kek_id}:"
        found: dict[int, Object] = {}
        query = {
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.KEY_TYPE: KeyType.AES,
            Attribute.ID: self._kek_id.encode("utf-8"),
        }
        try:
            for obj in self._session.get_objects(query):
                label = obj[Attribute.LABEL]
                if isinstance(label, str) and label.startswith(prefix) and label[len(prefix) :].isdecimal():
                    version = int(label[len(prefix) :])
                    if version in found:
                        raise KeyProviderError(f"PKCS#11 token holds two objects labelled {label!r}")
                    found[version] = obj
        except p11err.PKCS11Error as exc:
            raise KeyProviderError(f"PKCS#11 object search failed: {type(exc).__name__}") from None
        return found

    def _generate(self, version: int) -> None:
        try:
            self._session.generate_key(
                KeyType.AES,
                256,
                id=self._kek_id.encode("utf-8"),
                label=self._label(version),
                store=True,
                capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
                template={
                    Attribute.PRIVATE: True,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.MODIFIABLE: False,
                    Attribute.COPYABLE: False,
                },
            )
        except p11err.PKCS11Error as exc:
            raise KeyProviderError(f"PKCS#11 could not generate KEK version {version}: {type(exc).__name__}") from None


if TYPE_CHECKING:

    def _conforms(provider: Pkcs11KekProvider) -> KekProvider:
        return provider
