"""The unwrapped-DEK cache respects its three bounds: age, uses, entries (LRU)."""

from __future__ import annotations

from uuid import uuid4

import pytest

from crypto.dek_cache import DataKeyCache
from crypto.keys import DataKey


class FakeClock:
    """A settable monotonic clock (seconds)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_a_cached_key_is_returned(clock: FakeClock) -> None:
    cache = DataKeyCache(clock=clock)
    key = DataKey.generate()
    assert cache.get(key.id, key.version) is None
    cache.put(key)
    assert cache.get(key.id, key.version) is key
    assert cache.get(key.id, key.version + 1) is None
    assert len(cache) == 1


def test_an_entry_expires_at_max_age(clock: FakeClock) -> None:
    cache = DataKeyCache(max_age=60, clock=clock)
    key = DataKey.generate()
    cache.put(key)
    clock.now += 59.9
    assert cache.get(key.id, key.version) is key  # using it does not extend its life
    clock.now += 0.1
    assert cache.get(key.id, key.version) is None
    assert len(cache) == 0


def test_expired_entries_are_purged_on_put_even_if_never_read(clock: FakeClock) -> None:
    cache = DataKeyCache(max_age=10, clock=clock)
    stale = DataKey.generate()
    cache.put(stale)
    clock.now += 11
    cache.put(DataKey.generate())
    assert len(cache) == 1
    clock.now += 11
    cache.purge_expired()
    assert len(cache) == 0


def test_an_entry_is_dropped_after_max_uses(clock: FakeClock) -> None:
    cache = DataKeyCache(max_uses=3, clock=clock)
    key = DataKey.generate()
    cache.put(key)
    assert [cache.get(key.id, key.version) for _ in range(4)] == [key, key, key, None]
    cache.put(key)  # unwrapped again: a fresh allowance
    assert cache.get(key.id, key.version) is key


def test_the_least_recently_used_entry_is_evicted_at_max_entries(clock: FakeClock) -> None:
    cache = DataKeyCache(max_entries=3, clock=clock)
    a, b, c, d = (DataKey.generate() for _ in range(4))
    for key in (a, b, c):
        cache.put(key)
    assert cache.get(a.id, a.version) is a  # a is now the most recently used; b the least
    cache.put(d)
    assert len(cache) == 3
    assert cache.get(b.id, b.version) is None
    assert {cache.get(k.id, k.version) for k in (a, c, d)} == {a, c, d}


def test_discard_drops_one_version_or_all_versions_of_a_dek(clock: FakeClock) -> None:
    cache = DataKeyCache(clock=clock)
    dek_id = uuid4()
    v1, v2, other = DataKey(dek_id, 1, bytes(32)), DataKey(dek_id, 2, bytes(32)), DataKey.generate()
    for key in (v1, v2, other):
        cache.put(key)
    cache.discard(dek_id, 1)
    assert cache.get(dek_id, 1) is None
    assert cache.get(dek_id, 2) is v2
    cache.discard(dek_id)
    assert cache.get(dek_id, 2) is None
    assert cache.get(other.id, other.version) is other
    cache.clear()
    assert len(cache) == 0


@pytest.mark.parametrize(
    "bounds", [{"max_entries": 0}, {"max_uses": 0}, {"max_age": 0}, {"max_age": -1.0}, {"max_age": float("nan")}]
)
def test_bounds_must_be_positive(bounds: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="positive"):
        DataKeyCache(**bounds)  # type: ignore[arg-type]


def test_the_cache_repr_shows_no_keys() -> None:
    cache = DataKeyCache()
    key = DataKey.generate()
    cache.put(key)
    assert key.secret.hex() not in repr(cache)
    assert str(key.id) not in repr(cache)
