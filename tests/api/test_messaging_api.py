"""Secure messaging as portals use it: threads, messages, receipts, recall, break-glass, care teams."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from pathlib import Path

import asyncpg
from structlog.testing import capture_logs

from crypto.errors import KeyProviderError
from service.logs import summarize_exception
from tests.api.messaging_helpers import consent, patient, physician, thread
from tests.conftest import Portals
from tests.support import AUDIT_EVENTS, audit_events, canary, unreadable


async def test_a_patient_and_a_physician_converse(client, portals: Portals) -> None:
    await consent(client, portals)
    created = await thread(client, portals, message="Can I take ibuprofen with it?")
    assert created["message"]["seq"] == 1
    assert created["subject"] == "Question about my medication"

    listed = await (await client.get("/v1/threads", headers=physician(portals))).json()
    assert [(t["id"], t["unread"]) for t in listed["items"]] == [(created["id"], 1)]
    messages = await (await client.get(f"/v1/threads/{created['id']}/messages", headers=physician(portals))).json()
    assert [m["body"] for m in messages["items"]] == ["Can I take ibuprofen with it?"]

    reply = await client.post(
        f"/v1/threads/{created['id']}/messages",
        json={"body": "Yes, with food.", "in_reply_to": created["message"]["id"]},
        headers=physician(portals),
    )
    assert reply.status == 201
    assert (await reply.json())["seq"] == 2
    mine = await (await client.get("/v1/threads", headers=patient(portals))).json()
    assert mine["items"][0]["unread"] == 1
    receipt = await client.post(f"/v1/threads/{created['id']}/read", json={"up_to": 2}, headers=patient(portals))
    assert (await receipt.json())["up_to"] == 2
    detail = await (await client.get(f"/v1/threads/{created['id']}", headers=patient(portals))).json()
    assert detail["unread"] == 0
    assert [r["reader"] for r in detail["receipts"]] == ["Patient/1"]


async def test_a_thread_and_the_listing_count_the_same_unread_messages(client, portals: Portals) -> None:
    """Unread: the others' messages after the reader's receipt. Not one's own, not a recalled one."""
    await consent(client, portals)
    created = await thread(client, portals, message="first")

    async def unread(who: dict[str, str]) -> tuple[int, int]:
        detail = await (await client.get(f"/v1/threads/{created['id']}", headers=who)).json()
        listed = await (await client.get("/v1/threads", headers=who)).json()
        return detail["unread"], next(t["unread"] for t in listed["items"] if t["id"] == created["id"])

    assert await unread(patient(portals)) == (0, 0)  # the patient wrote the only message
    assert await unread(physician(portals)) == (1, 1)
    second = await client.post(f"/v1/threads/{created['id']}/messages", json={"body": "x"}, headers=patient(portals))
    assert await unread(physician(portals)) == (2, 2)
    recall = await client.post(f"/v1/messages/{(await second.json())['id']}/recall", headers=patient(portals))
    assert recall.status == 200
    assert await unread(physician(portals)) == (1, 1)  # a tombstone has nothing to read
    await client.post(f"/v1/threads/{created['id']}/messages", json={"body": "y"}, headers=physician(portals))
    assert await unread(patient(portals)) == (1, 1)
    assert await unread(physician(portals)) == (1, 1)  # the physician's own reply is not unread for them

    # Receipts come with an answer about one thread (a read, a close), not with a listing's items.
    receipt = await client.post(f"/v1/threads/{created['id']}/read", json={"up_to": 3}, headers=patient(portals))
    assert receipt.status == 200
    listed = await (await client.get("/v1/threads", headers=patient(portals))).json()
    assert [t["receipts"] for t in listed["items"]] == [None]
    closed = await (await client.post(f"/v1/threads/{created['id']}/close", headers=physician(portals))).json()
    assert (closed["unread"], [(r["reader"], r["up_to"]) for r in closed["receipts"]]) == (1, [("Patient/1", 3)])


async def test_no_consent_no_thread_and_a_revocation_stops_the_next_message(client, portals: Portals) -> None:
    refused = await client.post(
        "/v1/threads",
        json={"patient": "Patient/1", "participants": ["Practitioner/7"], "subject": "Hi"},
        headers=patient(portals),
    )
    assert refused.status == 403
    assert (await refused.json())["code"] == "consent-required"

    grant = await consent(client, portals)
    created = await thread(client, portals)
    revoke = await client.post(
        f"/v1/consents/{grant['id']}/revoke", json={"reason": "patient-request"}, headers=patient(portals)
    )
    assert revoke.status == 200
    for who in (patient(portals), physician(portals)):
        send = await client.post(f"/v1/threads/{created['id']}/messages", json={"body": "more"}, headers=who)
        assert send.status == 403
        assert (await send.json())["type"] == "urn:bedside:problem:consent-required"
        # What was exchanged stays readable by its participants.
        old = await client.get(f"/v1/threads/{created['id']}/messages", headers=who)
        assert [m["body"] for m in (await old.json())["items"]] == ["Hello"]


async def test_twenty_concurrent_sends_with_one_key_make_one_message(client, portals: Portals, database) -> None:
    await consent(client, portals)
    created = await thread(client, portals, message=None)
    headers = {**patient(portals), "Idempotency-Key": "retry-me"}
    url = f"/v1/threads/{created['id']}/messages"
    responses = await asyncio.gather(*(client.post(url, json={"body": "once"}, headers=headers) for _ in range(20)))
    bodies = [await r.json() for r in responses]
    assert {r.status for r in responses} == {201}
    assert len({b["id"] for b in bodies}) == 1
    listed = await (await client.get(url, headers=patient(portals))).json()
    assert len(listed["items"]) == 1
    different = await client.post(url, json={"body": "another"}, headers=headers)
    assert different.status == 422
    # Each replay handed the message back, so each is recorded as a read of it.
    reads = await audit_events(database.owner, "action = 'message:read' AND resource_id = $1", bodies[0]["id"])
    assert len(reads) == sum(1 for r in responses if r.headers.get("Idempotent-Replayed") == "true") == 19


async def test_message_pages_never_skip_or_repeat_while_messages_arrive(client, portals: Portals) -> None:
    await consent(client, portals)
    created = await thread(client, portals, message=None)
    url = f"/v1/threads/{created['id']}/messages"
    for i in range(10):
        await client.post(url, json={"body": f"m{i}"}, headers=patient(portals))

    async def writer() -> None:
        for i in range(10, 40):
            await client.post(url, json={"body": f"m{i}"}, headers=physician(portals))

    writing = asyncio.create_task(writer())
    seen, after = [], 0
    deadline = asyncio.get_running_loop().time() + 60  # a bound on time, not on pages: CI may be slow
    while asyncio.get_running_loop().time() < deadline:
        finished = writing.done()  # read before the page: an empty page after the last write ends it
        page = await (await client.get(url, params={"after": after, "limit": 3}, headers=patient(portals))).json()
        seen += [m["seq"] for m in page["items"]]
        if page["items"]:
            after = page["items"][-1]["seq"]
        elif finished:
            break
        else:
            await asyncio.sleep(0.01)
    await writing
    assert seen == list(range(1, 41))
    latest = await (await client.get(url, params={"limit": 5}, headers=patient(portals))).json()
    assert [m["seq"] for m in latest["items"]] == [36, 37, 38, 39, 40]


async def test_thread_pages_never_skip_or_repeat_while_threads_arrive(client, portals: Portals) -> None:
    await consent(client, portals)
    for _ in range(7):
        await thread(client, portals, message=None)
    seen, cursor = [], None
    while True:
        params = {"limit": "3", **({"cursor": cursor} if cursor else {})}
        page = await (await client.get("/v1/threads", params=params, headers=patient(portals))).json()
        seen += [t["id"] for t in page["items"]]
        await thread(client, portals, message="news")  # arrives mid-listing: newer than every page
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len(seen) == len(set(seen)) == 7


async def test_recall_before_it_is_read_and_not_after(client, portals: Portals) -> None:
    await consent(client, portals)
    created = await thread(client, portals, message="oops, wrong patient")
    message_id = created["message"]["id"]
    assert (await client.post(f"/v1/messages/{message_id}/recall", headers=physician(portals))).status == 404
    recalled = await client.post(f"/v1/messages/{message_id}/recall", headers=patient(portals))
    assert recalled.status == 200
    tombstone = await (await client.get(f"/v1/messages/{message_id}", headers=physician(portals))).json()
    assert tombstone["body"] is None
    assert tombstone["recalled_by"] == "Patient/1"

    second = await client.post(
        f"/v1/threads/{created['id']}/messages", json={"body": "second"}, headers=patient(portals)
    )
    second_id = (await second.json())["id"]
    await client.post(f"/v1/threads/{created['id']}/read", json={"up_to": 2}, headers=physician(portals))
    too_late = await client.post(f"/v1/messages/{second_id}/recall", headers=patient(portals))
    assert too_late.status == 409


async def test_break_glass_reads_for_a_while_and_is_reviewed(client, portals: Portals, database) -> None:
    await consent(client, portals)
    created = await thread(client, portals, message="chest pain since this morning")
    outsider = physician(portals, n=99)
    url = f"/v1/threads/{created['id']}"
    assert (await client.get(url, headers=outsider)).status == 404
    short = await client.get(url, headers={**outsider, "Break-Glass-Reason": "urgent"})
    assert short.status == 422
    opened = await client.get(url, headers={**outsider, "Break-Glass-Reason": "Unconscious in the ED, need history"})
    assert opened.status == 200
    assert (await opened.json())["access"] == "read"
    messages = await client.get(f"{url}/messages", headers=outsider)  # the grant holds without the header
    assert [m["body"] for m in (await messages.json())["items"]] == ["chest pain since this morning"]
    assert (await client.post(f"{url}/messages", json={"body": "hi"}, headers=outsider)).status == 404  # read only

    compliance = portals.acme.auth(role="compliance", sub="Practitioner/c1")
    review = await (await client.get("/v1/audit/break-glass", params={"reviewed": "false"}, headers=compliance)).json()
    assert [(g["physician"], g["reason"]) for g in review["items"]] == [
        ("Practitioner/99", "Unconscious in the ED, need history")
    ]
    done = await client.post(f"/v1/audit/break-glass/{review['items'][0]['id']}/review", headers=compliance)
    assert done.status == 204
    assert (await (await client.get("/v1/audit/break-glass", params={"reviewed": "false"}, headers=compliance)).json())[
        "items"
    ] == []

    owner = await asyncpg.connect(database.owner)
    try:  # the grant runs out
        await owner.execute("UPDATE break_glass SET expires_at = now() - interval '1 second'")
    finally:
        await owner.close()
    assert (await client.get(f"{url}/messages", headers=outsider)).status == 404


async def test_a_proxy_sees_sensitive_threads_only_when_included(client, portals: Portals) -> None:
    from datetime import UTC, datetime, timedelta

    await consent(client, portals)
    ordinary = await thread(client, portals)
    sensitive = await thread(client, portals, sensitive=True)
    proxy = portals.acme.auth(role="proxy", sub="RelatedPerson/mum", act_for="Patient/1")
    assert (await (await client.get("/v1/threads", headers=proxy)).json())["items"] == []  # no proxy consent yet

    until = (datetime.now(UTC) + timedelta(days=90)).isoformat()
    await consent(client, portals, grantee="RelatedPerson/mum", scope="proxy", valid_until=until)
    visible = await (await client.get("/v1/threads", headers=proxy)).json()
    assert [t["id"] for t in visible["items"]] == [ordinary["id"]]
    assert (await client.get(f"/v1/threads/{sensitive['id']}", headers=proxy)).status == 404

    await consent(
        client, portals, grantee="RelatedPerson/mum", scope="proxy", valid_until=until, include_sensitive=True
    )
    visible = await (await client.get("/v1/threads", headers=proxy)).json()
    assert {t["id"] for t in visible["items"]} == {ordinary["id"], sensitive["id"]}


async def test_care_teams_reach_their_current_members(client, portals: Portals) -> None:
    admin = portals.acme.auth(role="admin", sub="Practitioner/admin")
    created = await client.post(
        "/v1/admin/care-teams",
        json={"team": "CareTeam/cardio", "members": ["Practitioner/7", "Practitioner/8"]},
        headers=admin,
    )
    assert created.status == 201
    await consent(client, portals, grantee="CareTeam/cardio")
    conversation = await thread(client, portals, participants=["CareTeam/cardio"])
    nurse = portals.acme.auth(role="staff", sub="Practitioner/8")
    assert (await client.get(f"/v1/threads/{conversation['id']}", headers=nurse)).status == 200
    assert (await client.get(f"/v1/threads/{conversation['id']}", headers=physician(portals))).status == 200

    changed = await client.put(
        "/v1/admin/care-teams/cardio/members", json={"members": ["Practitioner/7"]}, headers=admin
    )
    team = await changed.json()
    assert team["members"] == ["Practitioner/7"]
    assert [(m["member"], m["left_at"] is not None) for m in team["history"]] == [
        ("Practitioner/7", False),
        ("Practitioner/8", True),
    ]
    assert (await client.get(f"/v1/threads/{conversation['id']}", headers=nurse)).status == 404


async def test_membership_changes_apply_whole_one_after_another_each_audited_once(
    client, portals: Portals, database
) -> None:
    admin = portals.acme.auth(role="admin", sub="Practitioner/admin")
    created = await client.post(
        "/v1/admin/care-teams", json={"team": "CareTeam/onco", "members": ["Practitioner/1"]}, headers=admin
    )
    assert created.status == 201
    sets = [["Practitioner/2", "Practitioner/3"], ["Practitioner/1"], ["Practitioner/3", "Practitioner/4"]]
    changes = [
        client.put("/v1/admin/care-teams/onco/members", json={"members": sets[n % 3]}, headers=admin) for n in range(12)
    ]
    assert {r.status for r in await asyncio.gather(*changes)} == {200}

    team = await (await client.get("/v1/admin/care-teams/onco", headers=admin)).json()
    assert team["members"] in [sorted(s) for s in sets]
    # Every membership row is one join, every ended one a leave: no change was lost or counted twice.
    history = [(m["member"], m["left_at"] is not None) for m in team["history"]]
    events = await audit_events(database.owner, "resource_id = 'CareTeam/onco' AND action LIKE 'care_team:%'")
    joins = sorted(json.loads(e["details"])["member"] for e in events if e["action"] == "care_team:join")
    leaves = sorted(json.loads(e["details"])["member"] for e in events if e["action"] == "care_team:leave")
    assert joins == sorted(member for member, _ in history)
    assert leaves == sorted(member for member, left in history if left)
    assert all(e["actor"] == "Practitioner/admin" for e in events)


async def test_creating_and_reading_a_care_team_are_audited_by_the_admin(client, portals: Portals, database) -> None:
    admin = portals.acme.auth(role="admin", sub="Practitioner/admin")
    created = await client.post(
        "/v1/admin/care-teams",
        json={"team": "CareTeam/renal", "members": ["Practitioner/7", "Practitioner/8"]},
        headers=admin,
    )
    assert created.status == 201
    read = await client.get("/v1/admin/care-teams/renal", headers=admin)
    assert read.status == 200
    assert (await read.json())["members"] == ["Practitioner/7", "Practitioner/8"]

    events = await audit_events(database.owner, "resource_id = 'CareTeam/renal'")
    # The creation first, then each first member's join, then the admin's read of the team.
    assert [(e["action"], e["actor"], e["outcome"]) for e in events] == [
        ("care_team:create", "Practitioner/admin", "success"),
        ("care_team:join", "Practitioner/admin", "success"),
        ("care_team:join", "Practitioner/admin", "success"),
        ("care_team:read", "Practitioner/admin", "success"),
    ]
    assert [json.loads(e["details"]).get("member") for e in events[1:3]] == ["Practitioner/7", "Practitioner/8"]


async def test_a_shredded_patients_messages_read_as_410(client, portals: Portals) -> None:
    await consent(client, portals)
    created = await thread(client, portals)
    admin = portals.acme.auth(role="admin", sub="Practitioner/admin")
    shred = await client.post(
        "/v1/admin/keys/shred", json={"patient": "Patient/1", "confirm": "Patient/1"}, headers=admin
    )
    assert shred.status == 200
    gone = await client.get(f"/v1/threads/{created['id']}/messages", headers=patient(portals))
    assert gone.status == 410
    assert (await gone.json())["shredded_at"]


async def test_a_closed_thread_takes_no_more_messages(client, portals: Portals) -> None:
    await consent(client, portals)
    created = await thread(client, portals)
    closed = await client.post(f"/v1/threads/{created['id']}/close", headers=physician(portals))
    assert (await closed.json())["status"] == "closed"
    refused = await client.post(
        f"/v1/threads/{created['id']}/messages", json={"body": "late"}, headers=patient(portals)
    )
    assert refused.status == 409
    messages = await (await client.get(f"/v1/threads/{created['id']}/messages", headers=patient(portals))).json()
    assert [m["seq"] for m in messages["items"]] == [1]


async def test_a_proxy_without_sensitive_access_cannot_start_a_sensitive_thread(client, portals: Portals) -> None:
    from datetime import UTC, datetime, timedelta

    await consent(client, portals)
    until = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    await consent(client, portals, grantee="RelatedPerson/mum", scope="proxy", valid_until=until)
    proxy = portals.acme.auth(role="proxy", sub="RelatedPerson/mum", act_for="Patient/1")
    body = {"patient": "Patient/1", "participants": ["Practitioner/7"], "subject": "private", "sensitive": True}
    assert (await client.post("/v1/threads", json=body, headers=proxy)).status == 404
    assert (await client.post("/v1/threads", json={**body, "sensitive": False}, headers=proxy)).status == 201


async def _shred(client, portals: Portals, n: int) -> str:
    admin = portals.acme.auth(role="admin", sub="Practitioner/admin")
    body = {"patient": f"Patient/{n}", "confirm": f"Patient/{n}"}
    shred = await client.post("/v1/admin/keys/shred", json=body, headers=admin)
    assert shred.status == 200, await shred.text()
    return str((await shred.json())["shredded_at"])


async def test_one_shredded_patient_is_a_tombstone_in_a_thread_listing_not_a_410(client, portals: Portals) -> None:
    await consent(client, portals, n=1)
    await consent(client, portals, n=2)
    gone = await thread(client, portals, n=1)
    kept = await thread(client, portals, n=2)
    shredded_at = await _shred(client, portals, 1)

    listed = await client.get("/v1/threads", headers=physician(portals))
    assert listed.status == 200, await listed.text()
    items = {t["id"]: t for t in (await listed.json())["items"]}
    assert set(items) == {gone["id"], kept["id"]}
    tombstone = items[gone["id"]]
    assert tombstone["subject"] is None
    assert datetime.fromisoformat(tombstone["shredded_at"]) == datetime.fromisoformat(shredded_at)
    assert (tombstone["patient"], tombstone["participants"], tombstone["last_seq"]) == (
        "Patient/1",
        ["Practitioner/7"],
        1,
    )
    assert items[kept["id"]]["subject"] == "Question about my medication"
    assert items[kept["id"]]["shredded_at"] is None
    # The thread itself still answers 410 with its tombstone.
    assert (await client.get(f"/v1/threads/{gone['id']}", headers=physician(portals))).status == 410


async def test_one_shredded_patient_is_a_tombstone_in_the_break_glass_review(client, portals: Portals) -> None:
    outsider = physician(portals, n=99)
    reason = "Unconscious in the ED, need history"
    for n in (1, 2):
        await consent(client, portals, n=n)
        created = await thread(client, portals, n=n)
        opened = await client.get(f"/v1/threads/{created['id']}", headers={**outsider, "Break-Glass-Reason": reason})
        assert opened.status == 200
    await _shred(client, portals, 1)

    compliance = portals.acme.auth(role="compliance", sub="Practitioner/c1")
    review = await client.get("/v1/audit/break-glass", headers=compliance)
    assert review.status == 200, await review.text()
    items = (await review.json())["items"]
    assert len(items) == 2
    by_reason = {(g["reason"], g["shredded_at"] is None) for g in items}
    assert by_reason == {(None, False), (reason, True)}
    tombstone = next(g for g in items if g["reason"] is None)
    assert tombstone["physician"] == "Practitioner/99"
    assert tombstone["reviewed"] is False
    # A tombstoned grant is still reviewable.
    done = await client.post(f"/v1/audit/break-glass/{tombstone['id']}/review", headers=compliance)
    assert done.status == 204


async def test_unread_pages_are_full_and_walk_exactly_the_unread_threads(client, portals: Portals) -> None:
    await consent(client, portals)
    # Newest first, as listed: read and unread interleaved, with runs of read threads longer than a page.
    unread_pattern = [False, False, True, False, False, False, True, True, False, True, False, False]
    created = [await thread(client, portals) for _ in unread_pattern]  # oldest first
    newest_first = list(reversed(created))
    for item, unread in zip(newest_first, unread_pattern, strict=True):
        if not unread:
            receipt = await client.post(f"/v1/threads/{item['id']}/read", json={"up_to": 1}, headers=physician(portals))
            assert receipt.status == 200
    expected = [t["id"] for t, unread in zip(newest_first, unread_pattern, strict=True) if unread]

    pages, cursor = [], None
    for _ in range(10):  # bounded: a cursor that cycles must fail the test, not hang the suite
        params = {"unread": "true", "limit": "2", **({"cursor": cursor} if cursor else {})}
        response = await client.get("/v1/threads", params=params, headers=physician(portals))
        assert response.status == 200
        page = await response.json()
        pages.append([t["id"] for t in page["items"]])
        assert all(t["unread"] > 0 for t in page["items"])
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert [i for page in pages for i in page] == expected
    assert [len(page) for page in pages] == [2, 2]  # every page full while unread threads remain


async def test_ids_that_are_not_uuids_are_404_audited_as_denied_without_the_callers_text(
    client, portals: Portals, database
) -> None:
    planted = canary("path")  # attacker-controlled text in the id's place; never a UUID
    probes = [
        ("GET", f"/v1/threads/{planted}", "Thread", "get_thread"),
        ("POST", f"/v1/threads/{planted}/messages", "Thread", "send_message"),
        ("GET", f"/v1/messages/{planted}", "Message", "get_message"),
        ("POST", f"/v1/messages/{planted}/recall", "Message", "recall_message"),
        ("GET", f"/v1/attachments/{planted}", "Attachment", "download_attachment"),
        ("GET", f"/v1/consents/{planted}", "Consent", "get_consent"),
    ]
    for method, url, _, _ in probes:
        response = await client.request(method, url, json={"body": "x"}, headers=patient(portals))
        assert response.status == 404, url
        assert (await response.json())["code"] == "not-found"

    owner = await asyncpg.connect(database.owner)
    try:
        events = await owner.fetch(f"SELECT * FROM {AUDIT_EVENTS} WHERE action = 'access:denied'")  # noqa: S608
        leaked = await owner.fetchval(  # whole rows of both tables: every column, now and later
            "SELECT count(*) FROM (SELECT o::text AS row, entry FROM audit_outbox o "
            "UNION ALL SELECT l::text, entry FROM audit_leaves l) e "
            "WHERE strpos(e.row, $1) > 0 OR position($2::bytea IN e.entry) > 0",
            planted,
            planted.encode(),
        )
    finally:
        await owner.close()
    recorded = sorted(
        (e["actor"], e["outcome"], e["resource_type"], e["resource_id"], json.loads(e["details"])["route"])
        for e in events
    )
    assert recorded == sorted(("Patient/1", "denied", kind, None, route) for _, _, kind, route in probes)
    assert all(json.loads(e["details"])["reason"] == "malformed-id" for e in events)
    assert leaked == 0


async def test_a_thread_whose_key_the_unreadable_kek_file_cannot_wrap_is_a_500_naming_the_providers_error(
    client, portals: Portals, kek_file: Path
) -> None:
    """The key file became unreadable under the running service (here a symlink loop; a permission or an
    I/O error alike): a new patient's data key cannot be wrapped, so nothing is created. The answer is the
    internal-error problem of any fault of ours, and the log names the key provider's error, not a bare
    OSError; its message (the file and the reason) is what `bedside keys` and start-up show."""
    await consent(client, portals)
    with unreadable(kek_file), capture_logs(processors=[summarize_exception]) as logs:
        response = await client.post(
            "/v1/threads",
            json={"patient": "Patient/1", "participants": ["Practitioner/7"], "subject": "s", "message": {"body": "b"}},
            headers=patient(portals),
        )
    assert response.status == 500, await response.text()
    problem = await response.json(content_type="application/problem+json")
    assert (problem["status"], problem["code"]) == (500, "internal-error")
    [event] = [e for e in logs if e["event"] == "http.unhandled"]
    assert event["error_type"] == KeyProviderError.__qualname__


async def test_a_thread_is_closed_once(client, portals: Portals, database) -> None:
    await consent(client, portals)
    created = await thread(client, portals)
    url = f"/v1/threads/{created['id']}/close"
    assert (await client.post(url, headers=physician(portals))).status == 200
    again = await client.post(url, headers=patient(portals))
    assert again.status == 409
    closes = await audit_events(database.owner, "action = 'thread:close'")
    assert [e["actor"] for e in closes] == ["Practitioner/7"]


async def test_a_thread_key_used_again_with_another_first_message_is_422(client, portals: Portals) -> None:
    await consent(client, portals)
    headers = {**patient(portals), "Idempotency-Key": "new-thread-1"}
    body = {"patient": "Patient/1", "participants": ["Practitioner/7"], "subject": "Question", "message": {"body": "a"}}
    first = await client.post("/v1/threads", json=body, headers=headers)
    assert first.status == 201
    replayed = await client.post("/v1/threads", json=body, headers=headers)
    assert replayed.status == 201
    assert (await replayed.json())["id"] == (await first.json())["id"]

    other = await client.post("/v1/threads", json={**body, "message": {"body": "b"}}, headers=headers)
    assert other.status == 422
    assert [e["loc"] for e in (await other.json())["errors"]] == [["Idempotency-Key"]]


async def test_a_replayed_thread_creation_says_it_is_a_replay(client, portals: Portals) -> None:
    """The Idempotency-Key contract (service/api/headers.py): the stored answer to an earlier request with
    the same key comes with Idempotent-Replayed, for a new thread as for a message or a consent."""
    await consent(client, portals)
    for n, first_message in enumerate((None, {"body": "first"})):
        headers = {**patient(portals), "Idempotency-Key": f"thread-replay-{n}"}
        body: dict = {"patient": "Patient/1", "participants": ["Practitioner/7"], "subject": "Question"}
        if first_message is not None:
            body["message"] = first_message
        first = await client.post("/v1/threads", json=body, headers=headers)
        assert first.status == 201
        assert "Idempotent-Replayed" not in first.headers
        replayed = await client.post("/v1/threads", json=body, headers=headers)
        assert (replayed.status, (await replayed.json())["id"]) == (201, (await first.json())["id"])
        assert replayed.headers.get("Idempotent-Replayed") == "true", f"with first message: {first_message}"
