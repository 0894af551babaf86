"""Failed authentications, limited per source: each is audited until the source has spent its budget;
past it, failures are answered 429, counted, and audited as one summary per source and tenant.

Every request that fails authentication (a bad bearer token, a bad webhook signature) is an `auth:denied`
event, and audit leaves are never deleted: without a limit, anyone who can reach the service could grow
the log at will. So each source address (the client's, `client_address.py`) has a token bucket: `burst`
failures, refilled at `per_minute`. A failure within the budget is audited exactly as before. One past
it is not audited on its own; it is added to the source's tally (per tenant the failure named, with its
reason code and time), and `take` hands the tallies over to be written as summary events: periodically,
and when the service stops. A summary that cannot be written goes back into the table for the next try,
so no failure leaves without being counted. Successful authentications never touch the table.

A source is an IPv4 address, or an IPv6 /64 (one host's usual allocation: an attacker who holds one has
2^64 addresses, but one budget). Ever-new sources would each bring a fresh budget, so the process also has
one of its own (`global_burst`, refilled at `global_per_minute`): a failure is audited on its own only
while both its source's budget and the process's last. Past either, it is counted. So the log takes at most
the process's budget in single events, plus one summary per source and tenant with failures counted per
interval, whatever the flood.

Memory is bounded: at most `max_sources` sources are tracked (plus a shared overflow bucket), each with
at most `_TENANTS_PER_SOURCE` tallies of at most `_REASONS_PER_TALLY` reason codes. When the table is
full, a new source takes the place of the least recently failing one if that one owes nothing (its budget
is whole again and it has no tally); otherwise it shares the overflow bucket with every other source
that found the table full. That is the strict side: many addresses (a botnet, an IPv6 prefix) cannot
each get a fresh budget beyond the table's size, their failures are still counted (in the overflow's
summary, without their addresses), and a successful request from any of them is never limited.
"""

from __future__ import annotations

import ipaddress
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from uuid import UUID

from service.domain.audit import AuditAction, AuditEvent, AuditRecorder, RequestMeta, format_time
from service.errors import AuthenticationThrottledError

# A source's failures are tallied per tenant they named; beyond this many tenants, under no tenant.
_TENANTS_PER_SOURCE = 8
# Reason codes are the domain's fixed strings; a tally keeps this many, then "other". The same bound for
# the issuer keys (kids) or webhook secrets that verified a refused request (a revoked key's, a disabled
# endpoint's): a summary names them, as a single event would.
_REASONS_PER_TALLY = 16
_KEY_IDS_PER_TALLY = 16
SUMMARY_REASON = "rate-limited"


@dataclass(frozen=True, slots=True)
class FailureBudget:
    """How many failed authentications a source may have audited one by one, and how fast that comes back."""

    burst: int = 20
    per_minute: float = 20.0
    max_sources: int = 10_000
    # The process's own budget, over all sources.
    global_burst: int = 200
    global_per_minute: float = 600.0


@dataclass(frozen=True, slots=True)
class SuppressedDenials:
    """Failures of one source, in one tenant, answered 429 and not audited one by one."""

    source: str | None  # None: the source was unknown, or one of the overflow's
    tenant_id: UUID | None
    count: int
    first_at: datetime
    last_at: datetime
    reasons: frozenset[str]
    overflow: bool = False  # sources that found the table full: their addresses were not kept
    key_ids: frozenset[str] = frozenset()

    def event(self) -> AuditEvent:
        """The summary's `auth:denied` event: how many, which reasons and verifying keys, the first and
        last of them."""
        details: dict[str, str | int | bool | list[str]] = {
            "suppressed": self.count,
            "first_at": format_time(self.first_at),
            "last_at": format_time(self.last_at),
            "reasons": sorted(self.reasons),
        }
        if self.key_ids:
            details["key_ids"] = sorted(self.key_ids)
        if self.overflow:
            details["overflow"] = True
        return AuditEvent(action=AuditAction.AUTH_DENIED, tenant_id=self.tenant_id, details=details).denied(
            SUMMARY_REASON
        )


@dataclass(slots=True)
class _Tally:
    count: int
    first_at: datetime
    last_at: datetime
    reasons: set[str] = field(default_factory=set)
    key_ids: set[str] = field(default_factory=set)

    def add(
        self, count: int, first_at: datetime, last_at: datetime, reasons: Iterable[str], key_ids: Iterable[str] = ()
    ) -> None:
        self.count += count
        self.first_at = min(self.first_at, first_at)
        self.last_at = max(self.last_at, last_at)
        _bounded_add(self.reasons, reasons, _REASONS_PER_TALLY)
        _bounded_add(self.key_ids, key_ids, _KEY_IDS_PER_TALLY)


def _bounded_add(kept: set[str], new: Iterable[str], limit: int) -> None:
    """Add `new` to `kept`, which holds at most `limit` strings: the last place is "other"."""
    for item in new:
        if item not in kept:
            kept.add(item if len(kept) < limit - 1 else "other")


def source_key(address: str | None) -> str:
    """The source a failure counts against: an IPv4 address as it is, an IPv6 address's /64, anything
    else (no address, a Unix socket's) as given ("" for none)."""
    if not address:
        return ""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float  # monotonic seconds of the last refill
    tallies: dict[UUID | None, _Tally] = field(default_factory=dict)


class FailureLimiter:
    """The table of sources: their budgets and what they owe the audit log. In memory, per process;
    every method is synchronous, so no two requests interleave inside one."""

    def __init__(
        self,
        budget: FailureBudget,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._burst = float(budget.burst)
        self._rate = budget.per_minute / 60.0
        self._max_sources = budget.max_sources
        self._monotonic = monotonic
        self._clock = clock
        # Least recently failing first. The key is the source address ("" when there is none).
        self._sources: OrderedDict[str, _Bucket] = OrderedDict()
        self._overflow = _Bucket(self._burst, monotonic())
        self._global_burst = float(budget.global_burst)
        self._global_rate = budget.global_per_minute / 60.0
        self._global = _Bucket(self._global_burst, monotonic())

    def admit(self, source: str | None, tenant_id: UUID | None, reason: str, key_id: str | None = None) -> float | None:
        """None: audit this failure as usual (it spent one of its source's budget and one of the
        process's). Otherwise the seconds until both have budget again: the failure is counted for a
        summary instead (with `key_id`, the key that verified the refused request, if one did)."""
        now = self._monotonic()
        bucket = self._bucket(source_key(source), now)
        self._refill(bucket, now)
        _refill(self._global, now, self._global_burst, self._global_rate)
        if bucket.tokens >= 1 and self._global.tokens >= 1:
            bucket.tokens -= 1
            self._global.tokens -= 1
            return None
        moment = self._clock()
        self._tally(bucket, tenant_id).add(1, moment, moment, (reason,), () if key_id is None else (key_id,))
        return max((1 - bucket.tokens) / self._rate, (1 - self._global.tokens) / self._global_rate)

    def take(self) -> list[SuppressedDenials]:
        """Every tally, to be written as summaries (they leave the table), and the sources that owe
        nothing any more are forgotten."""
        now = self._monotonic()
        taken = [*self._take(None, self._overflow, overflow=True)]
        for source, bucket in list(self._sources.items()):
            taken += self._take(source or None, bucket, overflow=False)
            self._refill(bucket, now)
            if bucket.tokens >= self._burst:
                del self._sources[source]
        return taken

    def restore(self, summaries: Iterable[SuppressedDenials]) -> None:
        """Summaries that could not be written, back into the table (for the next `take`). One whose
        source has left a table that is full now is kept in the overflow's count: counted, without its address."""
        now = self._monotonic()
        for summary in summaries:
            bucket = self._overflow if summary.overflow else self._bucket(source_key(summary.source), now)
            tally = self._tally(bucket, summary.tenant_id, summary.first_at)
            tally.add(summary.count, summary.first_at, summary.last_at, summary.reasons, summary.key_ids)

    def pending(self) -> int:
        """How many failures the tallies count, not yet handed over."""
        buckets = [self._overflow, *self._sources.values()]
        return sum(tally.count for bucket in buckets for tally in bucket.tallies.values())

    def __len__(self) -> int:
        """How many sources the table tracks (the overflow bucket aside)."""
        return len(self._sources)

    def _bucket(self, source: str, now: float) -> _Bucket:
        bucket = self._sources.get(source)
        if bucket is not None:
            self._sources.move_to_end(source)
            return bucket
        if len(self._sources) >= self._max_sources:
            oldest_source, oldest = next(iter(self._sources.items()))
            self._refill(oldest, now)
            if oldest.tallies or oldest.tokens < self._burst:
                return self._overflow  # it still owes the log, or is still limited: not forgotten
            del self._sources[oldest_source]
        bucket = self._sources[source] = _Bucket(self._burst, now)
        return bucket

    def _refill(self, bucket: _Bucket, now: float) -> None:
        _refill(bucket, now, self._burst, self._rate)

    def _tally(self, bucket: _Bucket, tenant_id: UUID | None, at: datetime | None = None) -> _Tally:
        if tenant_id not in bucket.tallies and len(bucket.tallies) >= _TENANTS_PER_SOURCE:
            tenant_id = None
        tally = bucket.tallies.get(tenant_id)
        if tally is None:
            moment = at or self._clock()
            tally = bucket.tallies[tenant_id] = _Tally(0, moment, moment)
        return tally

    @staticmethod
    def _take(source: str | None, bucket: _Bucket, *, overflow: bool) -> list[SuppressedDenials]:
        taken = [
            SuppressedDenials(
                source=None if overflow else source,
                tenant_id=tenant_id,
                count=tally.count,
                first_at=tally.first_at,
                last_at=tally.last_at,
                reasons=frozenset(tally.reasons),
                overflow=overflow,
                key_ids=frozenset(tally.key_ids),
            )
            for tenant_id, tally in bucket.tallies.items()
        ]
        bucket.tallies.clear()
        return taken


def _refill(bucket: _Bucket, now: float, burst: float, rate: float) -> None:
    bucket.tokens = min(burst, bucket.tokens + (now - bucket.at) * rate)
    bucket.at = now


class AuthFailures:
    """Records `auth:denied` events through the limiter, and writes the summaries of what it held back."""

    def __init__(self, recorder: AuditRecorder, limiter: FailureLimiter) -> None:
        self._recorder = recorder
        self._limiter = limiter

    async def deny(self, event: AuditEvent, source: str | None) -> None:
        """Record the `auth:denied` `event` of a request from `source`, or, when the source is past its
        budget, count it for a summary and raise AuthenticationThrottledError (429)."""
        reason = event.details.get("reason")
        wait = self._limiter.admit(
            source, event.tenant_id, reason if isinstance(reason, str) else "unknown", event.key_id
        )
        if wait is not None:
            raise AuthenticationThrottledError(retry_after=max(1, math.ceil(wait)))
        await self._recorder.record_alone(event)

    async def flush(self) -> int:
        """Write a summary event for every tally; return how many failures they counted. Whatever is not
        written (the database is away, or this is cancelled) goes back into the table, and the error is
        raised: better a count written twice (a commit whose answer was lost) than one never written."""
        pending = self._limiter.take()
        written = 0
        try:
            while pending:
                summary = pending[0]
                # Its own request id (no request made it), and the source it counts.
                meta = RequestMeta(request_id=uuid.uuid4().hex, source=summary.source)
                await self._recorder.record_alone(summary.event(), meta=meta)
                pending.pop(0)
                written += summary.count
        finally:
            if pending:
                self._limiter.restore(pending)
        return written

    def pending(self) -> int:
        """Failures counted and not yet written."""
        return self._limiter.pending()
