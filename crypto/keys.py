"""Data keys (DEKs): the per-patient symmetric keys that seal records and attachment chunks."""

from __future__ import annotations

import os
from typing import NoReturn
from uuid import UUID, uuid4

DEK_BYTES = 32
MAX_DEK_VERSION = 2**32 - 1


class DataKey:
    """A 256-bit data key with its id (a UUID) and version (an unsigned 32-bit integer).

    The secret never appears in `repr`, `str` or exception text. Keys compare by identity only (no
    `==` on secrets, which would not be constant time), and refuse to be pickled or copied, so they do
    not leak into caches, queues or crash dumps by accident. Wrap a key with a KEK provider to store it.
    """

    __slots__ = ("_id", "_secret", "_version")

    _id: UUID
    _version: int
    _secret: bytes

    def __init__(self, id: UUID, version: int, secret: bytes) -> None:
        if not isinstance(id, UUID):
            raise TypeError("DataKey id must be a uuid.UUID")
        if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= MAX_DEK_VERSION:
            raise ValueError(f"DataKey version must be an integer in [0, {MAX_DEK_VERSION}]")
        if not isinstance(secret, bytes):
            raise TypeError("DataKey secret must be bytes")
        if len(secret) != DEK_BYTES:
            # The length is not secret; the bytes are never quoted.
            raise ValueError(f"DataKey secret must be {DEK_BYTES} bytes, got {len(secret)}")
        object.__setattr__(self, "_id", id)
        object.__setattr__(self, "_version", version)
        object.__setattr__(self, "_secret", secret)

    @classmethod
    def generate(cls, *, id: UUID | None = None, version: int = 1) -> DataKey:
        """Return a new random key (from `os.urandom`) with a fresh UUID unless `id` is given."""
        return cls(id if id is not None else uuid4(), version, os.urandom(DEK_BYTES))

    @property
    def id(self) -> UUID:
        """The key's id, written into every record header it seals."""
        return self._id

    @property
    def version(self) -> int:
        """The key's version, written into every record header it seals."""
        return self._version

    @property
    def secret(self) -> bytes:
        """The raw 32 key bytes. Only for wrapping with a KEK provider; never log or store them."""
        return self._secret

    def __repr__(self) -> str:
        return f"DataKey(id={self._id!s}, version={self._version}, secret=<redacted>)"

    __str__ = __repr__

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError("DataKey is immutable")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError("DataKey is immutable")

    def __reduce__(self) -> NoReturn:
        raise TypeError("DataKey cannot be pickled or copied; wrap it with a KEK provider instead")
