"""Retries as a receiver lives them: down for a while, answering errors, asking for time, redirecting,
gone, or failing for days (all on a compressed schedule). Nothing is dropped: every notification arrives,
or waits (dead-lettered or held) for an admin to bring it back."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
from standardwebhooks import Webhook

from service.settings import Settings
from tests.api.messaging_helpers import consent, patient, thread
from tests.api.webhook_helpers import ADMIN, Received, Receiver, admin_get, register, wait_for_delivery
from tests.conftest import Dsns, Portals

RECEIVER_BODY = "receiver body that must never be stored"
METADATA = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"


@pytest.fixture
def settings(settings: Settings, request: pytest.FixtureRequest) -> Settings:
    """The webhook test settings, with a test's own overrides (`parametrize("settings", [...], indirect=True)`)."""
    return settings.model_copy(update=getattr(request, "param", {}))


def path(endpoint_id: str, rest: str = "") -> str:
    return f"/v1/admin/webhook-endpoints/{endpoint_id}{rest}"


async def admin_post(client: Any, portals: Portals, url: str, body: dict[str, Any] | None = None) -> Any:
    response = await client.post(url, json=body, headers=portals.acme.auth(**ADMIN))
    assert response.status in (200, 202), await response.text()
    return await response.json()


async def send(client: Any, portals: Portals, thread_id: str, body: str = "another") -> None:
    response = await client.post(f"/v1/threads/{thread_id}/messages", json={"body": body}, headers=patient(portals))
    assert response.status == 201, await response.text()


async def delivery(client: Any, portals: Portals, endpoint_id: str, delivery_id: str) -> dict[str, Any]:
    view: dict[str, Any] = await admin_get(client, portals, path(endpoint_id, f"/deliveries/{delivery_id}"))
    return view


async def stored_rows(database: Dsns) -> list[str]:
    """Every delivery and attempt row, as text."""
    conn = await asyncpg.connect(database.owner)
    try:
        rows = await conn.fetch("SELECT row_to_json(o)::text AS row FROM webhook_outbox o")
        rows += await conn.fetch("SELECT row_to_json(a)::text AS row FROM webhook_attempts a")
    finally:
        await conn.close()
    return [r["row"] for r in rows]


def all_status(status: str, count: int) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda items: len(items) == count and all(i["status"] == status for i in items)


def verify_all(secret: str, received: list[Received]) -> None:
    for one in received:
        Webhook(secret).verify(one.body, one.headers)


@pytest.mark.parametrize(
    "settings", [{"webhook_retry_schedule_seconds": (0.1, 0.2, 0.3, 0.4) + (0.5,) * 8}], indirect=True
)
async def test_a_receiver_down_for_several_rounds_gets_every_notification_and_can_deduplicate(
    client, portals: Portals, receiver: Receiver, database: Dsns
) -> None:
    """The receiver is down through two or more retry rounds, then back but losing its first answer to
    each: every notification arrives, each webhook-id at least once, with identical bytes each time, so
    de-duplicating by webhook-id leaves exactly one per delivery. Each failed attempt is recorded with
    its error class, never the receiver's answer."""
    created = await register(client, portals, receiver.url)
    endpoint_id, secret = created["endpoint"]["id"], created["secrets"]["outbound_secret"]
    await consent(client, portals)
    await receiver.stop()
    made = await thread(client, portals, message="one")
    for n in range(3):
        await send(client, portals, made["id"], f"message {n}")
    await wait_for_delivery(
        client, portals, endpoint_id, lambda items: len(items) == 5 and all(i["attempts"] >= 2 for i in items)
    )

    answered: set[str] = set()

    def lose_the_first_answer(received: Received) -> tuple[int, dict[str, str]]:
        first = received.webhook_id not in answered
        answered.add(received.webhook_id)
        return (500, {}) if first else (200, {})

    receiver.respond = lose_the_first_answer
    await receiver.start()
    items = await wait_for_delivery(client, portals, endpoint_id, all_status("succeeded", 5))

    assert {r.webhook_id for r in receiver.received} == {i["webhook_id"] for i in items}
    assert set(Counter(r.webhook_id for r in receiver.received).values()) == {2}
    unique = {r.webhook_id: r for r in receiver.received}
    assert all(r.body == unique[r.webhook_id].body for r in receiver.received)
    assert sorted(r.json["type"] for r in unique.values()) == ["message.created"] * 4 + ["thread.created"]
    assert sorted(r.json["data"].get("seq", 0) for r in unique.values()) == [0, 1, 2, 3, 4]
    verify_all(secret, receiver.received)

    for item in items:
        log = (await delivery(client, portals, endpoint_id, item["id"]))["attempt_log"]
        outcomes = [(a["status_code"], a["error_class"]) for a in log]
        assert outcomes[-2:] == [(500, "http-status"), (200, None)]
        assert len(outcomes) >= 4
        assert set(outcomes[:-2]) == {(None, "connect")}
        assert [a["attempt"] for a in log] == list(range(1, len(log) + 1))
    assert not [row for row in await stored_rows(database) if RECEIVER_BODY in row]


async def test_non_2xx_answers_are_retried_then_dead_lettered_and_kept_until_recovered(
    client, portals: Portals, receiver: Receiver, database: Dsns
) -> None:
    """500, 400, 429 and 503 are all failures: retried with the same webhook-id and the same bytes, each
    signed anew; after the last step the delivery is dead, listed and audited; a recovery of its time
    range sends it again and it arrives."""
    statuses = iter([500, 400, 429, 503])
    receiver.respond = lambda received: (next(statuses, 500), {})
    created = await register(client, portals, receiver.url, event_types=["message.created"])
    endpoint_id, secret = created["endpoint"]["id"], created["secrets"]["outbound_secret"]
    await consent(client, portals)
    await thread(client, portals, message="hello")

    [dead] = await wait_for_delivery(client, portals, endpoint_id, all_status("dead", 1))
    view = await delivery(client, portals, endpoint_id, dead["id"])
    assert [(a["status_code"], a["error_class"]) for a in view["attempt_log"]] == [
        (500, "http-status"),
        (400, "http-status"),
        (429, "http-status"),
        (503, "http-status"),
    ]
    assert view["status"] == "dead"
    assert view["next_attempt_at"] is None
    assert view["delivered_at"] is None
    assert len(receiver.received) == 4
    assert {r.webhook_id for r in receiver.received} == {dead["webhook_id"]}
    assert len({r.body for r in receiver.received}) == 1
    verify_all(secret, receiver.received)
    listed = await admin_get(client, portals, path(endpoint_id, "/deliveries?status=dead"))
    assert [i["id"] for i in listed["items"]] == [dead["id"]]
    assert not [row for row in await stored_rows(database) if RECEIVER_BODY in row]
    conn = await asyncpg.connect(database.owner)
    try:
        letters = await conn.fetch(
            "SELECT resource_id FROM audit_outbox WHERE action = 'webhook:dead_letter' "
            "UNION ALL SELECT resource_id FROM audit_leaves WHERE action = 'webhook:dead_letter'"
        )
    finally:
        await conn.close()
    assert [r["resource_id"] for r in letters] == [dead["id"]]

    receiver.respond = lambda received: (200, {})
    recovered = await admin_post(
        client,
        portals,
        path(endpoint_id, "/recover"),
        {"since": dead["created_at"], "until": "2100-01-01T00:00:00Z"},
    )
    assert recovered == {"recovered": 1}
    [done] = await wait_for_delivery(client, portals, endpoint_id, all_status("succeeded", 1))
    assert done["attempts"] == 5
    assert done["delivered_at"] is not None
    assert len(receiver.received) == 5
    assert receiver.received[-1].webhook_id == dead["webhook_id"]
    assert receiver.received[-1].body == receiver.received[0].body
    verify_all(secret, receiver.received[-1:])


async def test_a_recovery_outside_the_time_range_brings_nothing_back(
    client, portals: Portals, receiver: Receiver
) -> None:
    """Recovery is by creation time: a range that ends before the delivery leaves it dead and unsent."""
    receiver.respond = lambda received: (500, {})
    created = await register(client, portals, receiver.url, event_types=["message.created"])
    endpoint_id = created["endpoint"]["id"]
    await consent(client, portals)
    await thread(client, portals)
    [dead] = await wait_for_delivery(client, portals, endpoint_id, all_status("dead", 1))

    recovered = await admin_post(
        client, portals, path(endpoint_id, "/recover"), {"since": "2000-01-01T00:00:00Z", "until": dead["created_at"]}
    )

    assert recovered == {"recovered": 0}
    assert (await delivery(client, portals, endpoint_id, dead["id"]))["status"] == "dead"


async def test_retry_after_is_honoured_up_to_its_cap_and_each_attempt_is_signed_anew(
    client, portals: Portals, receiver: Receiver
) -> None:
    """A 503 with Retry-After: 3600 delays the retry beyond the 0.2 s step but only up to the 1 s cap; the
    retry has the same webhook-id and bytes, a later timestamp and a new signature."""
    arrivals: list[float] = []

    def busy_then_ok(received: Received) -> tuple[int, dict[str, str]]:
        arrivals.append(time.monotonic())
        return (503, {"Retry-After": "3600"}) if len(arrivals) == 1 else (200, {})

    receiver.respond = busy_then_ok
    created = await register(client, portals, receiver.url, event_types=["message.created"])
    await consent(client, portals)
    await thread(client, portals)
    await receiver.wait_for(lambda got: len(got) >= 2)

    assert 0.95 <= arrivals[1] - arrivals[0] < 3.0  # the 1 s cap, not the 0.2 s step, nor an hour
    first, second = receiver.received[:2]
    assert first.webhook_id == second.webhook_id
    assert first.body == second.body
    assert int(second.headers["webhook-timestamp"]) > int(first.headers["webhook-timestamp"])
    assert first.headers["webhook-signature"] != second.headers["webhook-signature"]
    verify_all(created["secrets"]["outbound_secret"], [first, second])
    [done] = await wait_for_delivery(client, portals, created["endpoint"]["id"], all_status("succeeded", 1))
    assert done["attempts"] == 2


async def test_an_admin_resend_keeps_the_webhook_id_with_a_new_timestamp_and_signature(
    client, portals: Portals, receiver: Receiver
) -> None:
    """Resending a delivered notification sends the same webhook-id and bytes again, freshly signed."""
    created = await register(client, portals, receiver.url, event_types=["message.created"])
    endpoint_id = created["endpoint"]["id"]
    await consent(client, portals)
    await thread(client, portals)
    [done] = await wait_for_delivery(client, portals, endpoint_id, all_status("succeeded", 1))
    first = receiver.received[0]
    await asyncio.sleep(max(0.0, int(first.headers["webhook-timestamp"]) + 1.05 - time.time()))  # a new second

    resent = await admin_post(client, portals, path(endpoint_id, f"/deliveries/{done['id']}/resend"))
    assert resent["webhook_id"] == done["webhook_id"]
    assert resent["status"] == "pending"
    await receiver.wait_for(lambda got: len(got) == 2)

    second = receiver.received[1]
    assert second.webhook_id == first.webhook_id == done["webhook_id"]
    assert second.body == first.body
    assert int(second.headers["webhook-timestamp"]) > int(first.headers["webhook-timestamp"])
    assert second.headers["webhook-signature"] != first.headers["webhook-signature"]
    verify_all(created["secrets"]["outbound_secret"], [second])
    [again] = await wait_for_delivery(client, portals, endpoint_id, lambda items: items[0]["attempts"] == 2)
    assert again["status"] == "succeeded"


async def test_a_redirect_is_never_followed(client, portals: Portals, receiver: Receiver) -> None:
    """301/302/307/308 to a cloud metadata address or to another receiver on this machine: recorded as
    "redirect" and retried, never followed (the redirect target never hears a thing), then dead."""
    target = Receiver()
    await target.start()
    try:
        answers = iter([(301, target.url), (302, METADATA), (307, target.url), (308, METADATA)])

        def redirect(received: Received) -> tuple[int, dict[str, str]]:
            status, location = next(answers, (302, target.url))
            return status, {"Location": location}

        receiver.respond = redirect
        created = await register(client, portals, receiver.url, event_types=["message.created"])
        endpoint_id = created["endpoint"]["id"]
        await consent(client, portals)
        await thread(client, portals)
        [dead] = await wait_for_delivery(client, portals, endpoint_id, all_status("dead", 1))

        log = (await delivery(client, portals, endpoint_id, dead["id"]))["attempt_log"]
        assert [(a["status_code"], a["error_class"]) for a in log] == [
            (301, "redirect"),
            (302, "redirect"),
            (307, "redirect"),
            (308, "redirect"),
        ]
        assert all(a["duration_ms"] < 1000 for a in log)  # answered at once: no hop was attempted
        assert len(receiver.received) == 4
        assert target.received == []
    finally:
        await target.stop()


async def test_410_gone_disables_the_endpoint_and_holds_deliveries_until_it_is_enabled(
    client, portals: Portals, receiver: Receiver, database: Dsns
) -> None:
    """A 410 disables the endpoint (reason gone) without retrying; later notifications are held, not sent
    and not dropped; enabling it releases them all and they arrive."""
    receiver.respond = lambda received: (410, {})
    created = await register(client, portals, receiver.url, event_types=["message.created"])
    endpoint_id, secret = created["endpoint"]["id"], created["secrets"]["outbound_secret"]
    await consent(client, portals)
    made = await thread(client, portals)
    await wait_for_delivery(client, portals, endpoint_id, all_status("held", 1))
    endpoint = await admin_get(client, portals, path(endpoint_id))
    assert (endpoint["status"], endpoint["disabled_reason"]) == ("disabled", "gone")
    assert len(receiver.received) == 1

    await send(client, portals, made["id"], "while disabled")
    items = await wait_for_delivery(client, portals, endpoint_id, all_status("held", 2))
    assert {i["held_reason"] for i in items} == {"endpoint-disabled"}
    assert [i["attempts"] for i in items] == [0, 1]  # newest first: the held one was never attempted
    assert len(receiver.received) == 1

    receiver.respond = lambda received: (200, {})
    enabled = await admin_post(client, portals, path(endpoint_id, "/enable"))
    assert enabled["released"] == 2
    assert enabled["endpoint"]["status"] == "enabled"
    items = await wait_for_delivery(client, portals, endpoint_id, all_status("succeeded", 2))
    assert {r.webhook_id for r in receiver.received[1:]} == {i["webhook_id"] for i in items}
    assert len(receiver.received) == 3
    verify_all(secret, receiver.received[1:])
    conn = await asyncpg.connect(database.owner)
    try:
        disabled = await conn.fetch(
            "SELECT details FROM audit_outbox WHERE action = 'webhook:disable' AND resource_id = $1 "
            "UNION ALL SELECT details FROM audit_leaves WHERE action = 'webhook:disable' AND resource_id = $1",
            endpoint_id,
        )
    finally:
        await conn.close()
    assert [json.loads(r["details"])["reason"] for r in disabled] == ["gone"]


@pytest.mark.parametrize(
    "settings",
    [{"webhook_disable_after_seconds": 1.0, "webhook_retry_schedule_seconds": (0.25,) * 20}],
    indirect=True,
)
async def test_an_endpoint_failing_longer_than_the_disable_period_is_disabled_and_holds_not_drops(
    client, portals: Portals, receiver: Receiver
) -> None:
    """An endpoint failing for longer than BEDSIDE_WEBHOOK_DISABLE_AFTER_SECONDS (1 s here) is disabled
    (reason failing) while its schedule still had steps left; its delivery and new ones are held, and
    all of them arrive once it is enabled again."""
    receiver.respond = lambda received: (500, {})
    created = await register(client, portals, receiver.url, event_types=["message.created"])
    endpoint_id = created["endpoint"]["id"]
    await consent(client, portals)
    made = await thread(client, portals)
    [held] = await wait_for_delivery(client, portals, endpoint_id, all_status("held", 1))
    assert held["held_reason"] == "endpoint-disabled"
    assert 4 <= held["attempts"] < 20  # failing > 1 s at 0.25 s a step, well before the schedule's end
    endpoint = await admin_get(client, portals, path(endpoint_id))
    assert (endpoint["status"], endpoint["disabled_reason"]) == ("disabled", "failing")
    assert endpoint["failing_since"] is not None
    tried = len(receiver.received)

    await send(client, portals, made["id"], "while disabled")
    await wait_for_delivery(client, portals, endpoint_id, all_status("held", 2))
    assert len(receiver.received) == tried

    receiver.respond = lambda received: (200, {})
    enabled = await admin_post(client, portals, path(endpoint_id, "/enable"))
    assert enabled["released"] == 2
    items = await wait_for_delivery(client, portals, endpoint_id, all_status("succeeded", 2))
    assert {r.webhook_id for r in receiver.received[tried:]} == {i["webhook_id"] for i in items}
    endpoint = await admin_get(client, portals, path(endpoint_id))
    assert (endpoint["status"], endpoint["failing_since"]) == ("enabled", None)


@pytest.mark.parametrize(
    "settings", [{"webhook_timeout_seconds": 0.5, "webhook_retry_schedule_seconds": (0.5, 0.5, 0.5)}], indirect=True
)
async def test_a_receiver_slower_than_the_timeout_is_given_up_on_and_retried(
    client, portals: Portals, receiver: Receiver
) -> None:
    """An attempt that outlasts the timeout is recorded as "timeout" (after about the timeout, not the
    receiver's pace) and retried; the retry arrives."""
    receiver.delay = 1.5
    created = await register(client, portals, receiver.url, event_types=["message.created"])
    endpoint_id = created["endpoint"]["id"]
    await consent(client, portals)
    await thread(client, portals)
    await wait_for_delivery(client, portals, endpoint_id, lambda items: bool(items) and items[0]["attempts"] >= 1)
    receiver.delay = 0.0

    [done] = await wait_for_delivery(client, portals, endpoint_id, all_status("succeeded", 1))
    log = (await delivery(client, portals, endpoint_id, done["id"]))["attempt_log"]
    assert (log[0]["status_code"], log[0]["error_class"]) == (None, "timeout")
    assert 450 <= log[0]["duration_ms"] < 1450  # the receiver would have taken 1500
    assert (log[-1]["status_code"], log[-1]["error_class"]) == (200, None)


async def test_a_status_code_outside_http_is_a_recorded_failure_not_a_stuck_delivery(
    client, portals: Portals, receiver: Receiver
) -> None:
    """A receiver answering with a status line HTTP does not define (999) gets a recorded, failed attempt
    and the usual quick retry: the attempt is not lost and the delivery does not wait out its lease."""
    answers = iter([999])
    receiver.respond = lambda received: (next(answers, 200), {})
    created = await register(client, portals, receiver.url, event_types=["message.created"])
    endpoint_id = created["endpoint"]["id"]
    await consent(client, portals)
    await thread(client, portals)

    [done] = await wait_for_delivery(client, portals, endpoint_id, all_status("succeeded", 1), within=5)
    log = (await delivery(client, portals, endpoint_id, done["id"]))["attempt_log"]
    assert len(log) == 2
    assert log[0]["status_code"] != 999
    assert log[0]["error_class"] is not None
    assert (log[1]["status_code"], log[1]["error_class"]) == (200, None)
    assert len(receiver.received) == 2
