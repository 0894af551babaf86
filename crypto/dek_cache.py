"""A bounded in-memory cache of unwrapped data keys.

Unwrapping a DEK costs a KEK provider call (file or HSM), so recently used DEKs are kept, but only
within three bounds: an entry expires `max_age` seconds after it was put, it is dropped after it has
been served `max_uses` times, and at most `max_entries` are held (least recently used evicted first).
A key that is crypto-shredded or whose wraps change must be `discard`ed by the caller.

Not thread-safe by design: the service uses it from its event loop thread only (asyncio runs one task
at a time and these methods never await). Python cannot wipe `bytes`, so an evicted key lingers in
freed memory until it is reused; the bounds limit how many keys and for how long, not that.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from uuid import UUID

from crypto.keys import DataKey

__all__ = ["DataKeyCache"]


@dataclass(slots=True)
class _Entry:
    key: DataKey
    stored_at: float
    uses: int = 0


class DataKeyCache:
    """LRU cache of `DataKey`s by (dek_id, dek_version), bounded by age, uses and size."""

    __slots__ = ("_clock", "_entries", "_max_age", "_max_entries", "_max_uses")

    def __init__(
        self,
        *,
        max_entries: int = 10_000,
        max_age: float = 300.0,
        max_uses: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Bounds: `max_entries` keys, `max_age` seconds (measured by `clock`), `max_uses` hits per entry."""
        if max_entries < 1 or max_uses < 1 or not max_age > 0:
            raise ValueError("max_entries, max_uses and max_age must be positive")
        self._max_entries = max_entries
        self._max_age = float(max_age)
        self._max_uses = max_uses
        self._clock = clock
        self._entries: OrderedDict[tuple[UUID, int], _Entry] = OrderedDict()

    def __repr__(self) -> str:
        return (
            f"DataKeyCache(entries={len(self._entries)}, max_entries={self._max_entries}, "
            f"max_age={self._max_age}, max_uses={self._max_uses})"
        )

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, dek_id: UUID, dek_version: int) -> DataKey | None:
        """Return the cached key and count one use, or None if absent, expired or used up."""
        ref = (dek_id, dek_version)
        entry = self._entries.get(ref)
        if entry is None:
            return None
        if self._clock() - entry.stored_at >= self._max_age:
            del self._entries[ref]
            return None
        entry.uses += 1
        if entry.uses >= self._max_uses:
            del self._entries[ref]  # this was its last permitted use
        else:
            self._entries.move_to_end(ref)
        return entry.key

    def put(self, key: DataKey) -> None:
        """Cache a freshly unwrapped key (replacing any entry for the same id and version)."""
        now = self._clock()
        self.purge_expired(now=now)
        ref = (key.id, key.version)
        self._entries.pop(ref, None)
        self._entries[ref] = _Entry(key=key, stored_at=now)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def discard(self, dek_id: UUID, dek_version: int | None = None) -> None:
        """Drop one version of a DEK, or every version when `dek_version` is None."""
        for ref in [r for r in self._entries if r[0] == dek_id and dek_version in (None, r[1])]:
            del self._entries[ref]

    def purge_expired(self, *, now: float | None = None) -> None:
        """Drop every entry older than `max_age` (also done on each `put`)."""
        current = self._clock() if now is None else now
        for ref in [r for r, e in self._entries.items() if current - e.stored_at >= self._max_age]:
            del self._entries[ref]

    def clear(self) -> None:
        """Drop every entry."""
        self._entries.clear()
