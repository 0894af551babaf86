"""The retry schedule and `Retry-After`, as pure functions: what decides when a receiver hears from us again."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.domain.webhooks import next_delay, parse_retry_after, payload_bytes, webhook_id

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
STANDARD = (5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400)

schedules = st.lists(st.floats(min_value=0, max_value=7 * 86_400), min_size=1, max_size=20).map(tuple)
jitters = st.floats(min_value=0, max_value=1)
rands = st.floats(min_value=0, max_value=1, exclude_max=True)
retry_afters = st.floats(min_value=0, max_value=10**9)
retry_after_maxes = st.floats(min_value=0, max_value=7 * 86_400)


@settings(max_examples=300)
@given(schedule=schedules, data=st.data(), jitter=jitters, rand=rands, cap=retry_after_maxes)
def test_a_delay_is_never_shorter_than_its_step_nor_longer_than_jitter_allows(
    schedule: tuple[float, ...], data: st.DataObject, jitter: float, rand: float, cap: float
) -> None:
    """Without Retry-After, attempt n waits its schedule step stretched by at most the jitter fraction."""
    tries = data.draw(st.integers(min_value=1, max_value=len(schedule)))
    step = schedule[tries - 1]

    delay = next_delay(tries, schedule, retry_after=None, jitter=jitter, retry_after_max=cap, rand=lambda: rand)

    assert delay is not None
    assert step <= delay <= step * (1 + jitter)


@settings(max_examples=300)
@given(schedule=schedules, data=st.data(), jitter=jitters, rand=rands, retry_after=retry_afters, cap=retry_after_maxes)
def test_retry_after_is_honoured_up_to_its_cap_and_never_shortens_the_schedule(
    schedule: tuple[float, ...], data: st.DataObject, jitter: float, rand: float, retry_after: float, cap: float
) -> None:
    """A receiver asking for more time gets it (up to the cap); one asking for less never speeds us up."""
    tries = data.draw(st.integers(min_value=1, max_value=len(schedule)))
    step = schedule[tries - 1]

    delay = next_delay(tries, schedule, retry_after=retry_after, jitter=jitter, retry_after_max=cap, rand=lambda: rand)

    assert delay is not None
    assert delay >= step
    assert delay <= max(step * (1 + jitter), cap)
    assert delay >= min(retry_after, cap)


@given(schedule=schedules, extra=st.integers(min_value=1, max_value=1000), retry_after=st.none() | retry_afters)
def test_the_schedule_is_spent_exactly_after_its_last_step(
    schedule: tuple[float, ...], extra: int, retry_after: float | None
) -> None:
    """After as many failures as the schedule has steps the delivery is dead-lettered (None), not before."""
    kwargs = {"retry_after": retry_after, "jitter": 0.2, "retry_after_max": 86_400.0, "rand": lambda: 0.5}

    assert next_delay(len(schedule), schedule, **kwargs) is not None  # type: ignore[arg-type]
    assert next_delay(len(schedule) + extra, schedule, **kwargs) is None  # type: ignore[arg-type]
    assert next_delay(0, schedule, **kwargs) is None  # type: ignore[arg-type]
    assert next_delay(-extra, schedule, **kwargs) is None  # type: ignore[arg-type]


def test_the_standard_schedule_step_by_step() -> None:
    """With no jitter the Standard Webhooks schedule comes out as written: 5 s, 5 min, ... 24 h, then dead."""
    delays = [
        next_delay(n, STANDARD, retry_after=None, jitter=0.0, retry_after_max=86_400, rand=lambda: 0.9)
        for n in range(1, len(STANDARD) + 2)
    ]

    assert delays == [*map(float, STANDARD), None]


@given(text=st.text(st.characters(exclude_categories=()), max_size=200))  # surrogates too (undecodable bytes)
def test_retry_after_never_raises_on_any_text(text: str) -> None:
    """Whatever a receiver sends in Retry-After, parsing never raises and never yields a negative wait."""
    parsed = parse_retry_after(text, NOW)

    assert parsed is None or parsed >= 0


@given(text=st.from_regex(r"[A-Za-z0-9 ,:+\-]{0,40}", fullmatch=True))
def test_retry_after_never_raises_on_date_like_text(text: str) -> None:
    """Text shaped like a broken HTTP date (the email date parser's hard cases) is ignored, not an error."""
    parsed = parse_retry_after(text, NOW)

    assert parsed is None or parsed >= 0


@settings(max_examples=50)
@given(
    digits=st.integers(min_value=1, max_value=8000).flatmap(
        lambda n: st.text(alphabet="0123456789", min_size=n, max_size=n)
    )
)
def test_retry_after_of_any_number_of_digits_never_raises(digits: str) -> None:
    """A receiver can send thousands of digits (aiohttp accepts 8 KiB headers): a long wait, not a crash
    of the attempt's settlement (which would leave it unrecorded and retried forever)."""
    parsed = parse_retry_after(digits, NOW)

    significant = digits.lstrip("0") or "0"
    assert parsed == (min(float(significant), 1e9) if len(significant) <= 10 else 1e9)


@given(seconds=st.integers(min_value=0, max_value=10**9), pad=st.sampled_from(["", " ", "\t", "  "]))
def test_retry_after_digits_are_that_many_seconds(seconds: int, pad: str) -> None:
    """Delta-seconds: `Retry-After: 120` means 120 seconds."""
    assert parse_retry_after(f"{pad}{seconds}{pad}", NOW) == float(seconds)


@given(ahead=st.integers(min_value=-10 * 86_400, max_value=400 * 86_400))
def test_retry_after_http_dates_are_seconds_from_now_never_negative(ahead: int) -> None:
    """An HTTP date is the time until then; a date already past means now (0), never a negative wait."""
    value = format_datetime(NOW + timedelta(seconds=ahead), usegmt=True)

    assert parse_retry_after(value, NOW) == float(max(ahead, 0))


@pytest.mark.parametrize("value", [None, "", " ", "-5", "1.5", "soon", "٣", "Wed, 99 Foo 2025 99:99:99 GMT"])
def test_retry_after_that_is_not_a_delay_or_a_date_is_ignored(value: str | None) -> None:
    """Absent, negative, fractional, non-ASCII digits or nonsense: no Retry-After (the schedule applies)."""
    assert parse_retry_after(value, NOW) is None


@given(
    event_type=st.sampled_from(["message.created", "message.recalled", "thread.created", "consent.revoked"]),
    ids=st.dictionaries(st.sampled_from(["thread_id", "message_id", "consent_id"]), st.uuids().map(str)),
    seq=st.integers(min_value=1, max_value=2**31),
)
def test_the_payload_is_thin_and_the_same_bytes_every_time(event_type: str, ids: dict[str, str], seq: int) -> None:
    """The body is {type, timestamp, data}, and the same inputs give the same bytes (retries resend them)."""
    data = {**ids, "seq": seq}
    first = payload_bytes(event_type, NOW, data)

    assert first == payload_bytes(event_type, NOW.astimezone(), dict(reversed(list(data.items()))))
    document = json.loads(first)
    assert document == {"type": event_type, "timestamp": "2025-03-01T12:00:00Z", "data": data}


def test_a_webhook_id_is_stable_and_in_the_spec_charset() -> None:
    """The `webhook-id` depends on the delivery only, and uses the characters receivers accept."""
    delivery = uuid.uuid4()

    assert webhook_id(delivery) == webhook_id(delivery) == f"msg_{delivery.hex}"
    assert webhook_id(delivery) != webhook_id(uuid.uuid4())
