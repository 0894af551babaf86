"""The table behind the limit on failed authentications: bounded whatever the flood, and every failure it
does not let through to the audit log one by one is counted in exactly one summary."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from service.domain.auth_failures import FailureBudget, FailureLimiter, SuppressedDenials


class Clock:
    def __init__(self) -> None:
        self.seconds = 1000.0

    def monotonic(self) -> float:
        return self.seconds

    def now(self) -> datetime:
        return datetime(2025, 1, 1, tzinfo=UTC) + timedelta(seconds=self.seconds)


def _limiter(
    clock: Clock,
    *,
    burst: int = 2,
    per_minute: float = 60.0,
    max_sources: int = 3,
    global_burst: int = 1_000_000,
    global_per_minute: float = 1_000_000.0,
) -> FailureLimiter:
    budget = FailureBudget(
        burst=burst,
        per_minute=per_minute,
        max_sources=max_sources,
        global_burst=global_burst,
        global_per_minute=global_per_minute,
    )
    return FailureLimiter(budget, monotonic=clock.monotonic, clock=clock.now)


def _counted(summaries: list[SuppressedDenials]) -> int:
    return sum(s.count for s in summaries)


def test_a_flood_from_ever_new_addresses_never_grows_the_table_past_its_cap() -> None:
    clock = Clock()
    limiter = _limiter(clock)
    admitted = 0
    for n in range(10_000):
        for _ in range(3):
            admitted += limiter.admit(f"2001:db8:{n:x}::1", None, "malformed") is None  # a /64 each
        assert len(limiter) <= 3
    # Three sources hold their places (each still owes the log); the rest shared one overflow budget.
    assert admitted == 3 * 2 + 2
    assert admitted + limiter.pending() == 30_000
    summaries = limiter.take()
    assert _counted(summaries) == 30_000 - admitted
    [overflow] = [s for s in summaries if s.overflow]
    assert overflow.source is None
    assert overflow.count == 30_000 - 3 * 3 - 2
    assert overflow.event().details["overflow"] is True


def test_a_full_table_makes_room_for_a_new_address_when_the_oldest_owes_nothing() -> None:
    clock = Clock()
    limiter = _limiter(clock)
    for n in range(3):
        assert limiter.admit(f"10.0.0.{n}", None, "expired") is None  # within budget: nothing owed
    clock.seconds += 5  # their budgets are whole again

    assert limiter.admit("10.0.0.9", None, "expired") is None
    assert limiter.admit("10.0.0.9", None, "expired") is None
    assert limiter.admit("10.0.0.9", None, "expired") is not None  # its own budget, not the overflow's

    [summary] = limiter.take()
    assert (summary.source, summary.count, summary.overflow) == ("10.0.0.9", 1, False)
    assert len(limiter) == 1  # the others owe nothing: forgotten; 10.0.0.9 is still limited


def test_the_budget_comes_back_at_its_rate_and_says_when() -> None:
    clock = Clock()
    limiter = _limiter(clock, burst=2, per_minute=20.0)
    assert limiter.admit("192.0.2.1", None, "expired") is None
    assert limiter.admit("192.0.2.1", None, "expired") is None
    wait = limiter.admit("192.0.2.1", None, "expired")
    assert wait is not None
    assert 2.9 < wait <= 3.0  # 20 a minute: one every three seconds
    clock.seconds += 3
    assert limiter.admit("192.0.2.1", None, "expired") is None


def test_each_summary_counts_one_source_and_tenant_and_is_handed_over_once() -> None:
    clock = Clock()
    limiter = _limiter(clock, burst=1)
    acme, globex = uuid.uuid4(), uuid.uuid4()
    limiter.admit("192.0.2.1", acme, "expired")
    for reason in ("expired", "bad-signature", "expired"):
        clock.seconds += 0.001
        limiter.admit("192.0.2.1", acme, reason)
    limiter.admit("192.0.2.1", globex, "unknown-key")

    summaries = {s.tenant_id: s for s in limiter.take()}

    assert {t: s.count for t, s in summaries.items()} == {acme: 3, globex: 1}
    assert summaries[acme].reasons == {"expired", "bad-signature"}
    assert summaries[acme].first_at < summaries[acme].last_at
    event = summaries[acme].event()
    assert event.tenant_id == acme
    assert event.details["suppressed"] == 3
    assert event.details["reason"] == "rate-limited"
    assert limiter.take() == []
    assert limiter.pending() == 0


def test_a_summary_that_could_not_be_written_is_counted_again_with_what_came_since() -> None:
    clock = Clock()
    limiter = _limiter(clock, burst=1)
    for _ in range(4):
        limiter.admit("192.0.2.1", None, "malformed")
    unwritten = limiter.take()

    limiter.restore(unwritten)
    limiter.admit("192.0.2.1", None, "malformed")

    [summary] = limiter.take()
    assert summary.count == 4
    assert summary.first_at == unwritten[0].first_at


def test_tallies_per_source_are_bounded_too() -> None:
    clock = Clock()
    limiter = _limiter(clock, burst=1)
    for _ in range(100):
        limiter.admit("192.0.2.1", uuid.uuid4(), f"reason-{uuid.uuid4().hex}")
    summaries = limiter.take()
    assert len(summaries) <= 9  # eight tenants, then no tenant
    assert _counted(summaries) == 99
    assert all(len(s.reasons) <= 16 for s in summaries)


def test_ever_new_addresses_over_time_get_no_more_single_events_than_the_process_budget() -> None:
    """Sources forgotten once their budget is whole again would each bring a fresh one: a flood from new
    addresses, spread over time, is held to the process's budget, and every failure past it is counted."""
    clock = Clock()
    limiter = _limiter(clock, burst=20, per_minute=20.0, max_sources=10_000, global_burst=50, global_per_minute=60.0)
    admitted = counted = 0
    for second in range(300):  # five minutes; 100 new addresses a second, 20 failures each
        for n in range(100):
            for _ in range(20):
                admitted += limiter.admit(f"198.{second // 256}.{second % 256}.{n}", None, "bad-signature") is None
        clock.seconds += 1
        if second % 60 == 59:
            counted += _counted(limiter.take())
    counted += _counted(limiter.take())
    assert admitted <= 50 + 300  # the burst, then one a second
    assert admitted + counted == 300 * 100 * 20


def test_an_ipv6_64_is_one_source_and_an_ipv4_mapped_address_is_its_ipv4() -> None:
    clock = Clock()
    limiter = _limiter(clock, burst=2)
    assert limiter.admit("2001:db8:1:2::1", None, "expired") is None
    assert limiter.admit("2001:db8:1:2:ffff::9", None, "expired") is None
    assert limiter.admit("2001:db8:1:2:abcd::", None, "expired") is not None  # the same /64's budget
    assert limiter.admit("2001:db8:1:3::1", None, "expired") is None  # another /64
    assert limiter.admit("::ffff:192.0.2.7", None, "expired") is None
    assert limiter.admit("192.0.2.7", None, "expired") is None
    assert limiter.admit("192.0.2.7", None, "expired") is not None
    sources = {s.source: s.count for s in limiter.take()}
    assert sources == {"2001:db8:1:2::/64": 1, "192.0.2.7": 1}


def test_a_summary_names_the_keys_that_verified_the_refused_requests() -> None:
    """A revoked key's tokens (or a disabled endpoint's signed replies) past the budget are counted, and
    the summary names the key, as each single event would: a flood of junk first hides nothing."""
    clock = Clock()
    limiter = _limiter(clock, burst=1)
    limiter.admit("192.0.2.1", None, "bad-signature")
    limiter.admit("192.0.2.1", None, "bad-signature")
    limiter.admit("192.0.2.1", None, "revoked-key", "portal-key-1")
    for n in range(40):
        limiter.admit("192.0.2.1", None, "revoked-key", f"kid-{n}")
    [summary] = limiter.take()
    assert summary.reasons == {"bad-signature", "revoked-key"}
    assert "portal-key-1" in summary.key_ids
    assert len(summary.key_ids) == 16
    assert "other" in summary.key_ids
    assert summary.event().details["key_ids"] == sorted(summary.key_ids)
