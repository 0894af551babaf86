"""The messaging rules of the issue that a portal relies on: the 64 KiB body limit, at most 20
participants, the thread listing's filters and bounds, message paging in both directions, the audited
consent refusal of a new thread, receipts and unread counts per reader, and pages that stay whole while
several writers send at once."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.api.messaging_helpers import consent, patient, physician, thread
from tests.conftest import Dsns, Portals
from tests.support import audit_events, owner_count

Client = TestClient[web.Request, web.Application]

KIB_64 = 64 * 1024


async def _messages_stored(owner_dsn: str, thread_id: str) -> int:
    return await owner_count(owner_dsn, "SELECT count(*) FROM messages WHERE thread_id = $1::uuid", thread_id)


async def _get(client: Client, url: str, headers: dict[str, str], **params: str | int) -> dict[str, Any]:
    response = await client.get(url, params={k: str(v) for k, v in params.items()}, headers=headers)
    assert response.status == 200, await response.text()
    answer: dict[str, Any] = await response.json()
    return answer


# -- body size ---------------------------------------------------------------------------------------


async def test_a_body_of_exactly_64_kib_is_accepted_and_one_byte_more_is_not(
    client: Client, portals: Portals, database: Dsns
) -> None:
    await consent(client, portals)
    created = await thread(client, portals, message=None)
    url = f"/v1/threads/{created['id']}/messages"
    accepted = ["a" * KIB_64, "é" * (KIB_64 // 2)]  # 65,536 bytes of UTF-8 each, in 1- and 2-byte characters
    for body in accepted:
        assert len(body.encode()) == KIB_64
        sent = await client.post(url, json={"body": body}, headers=patient(portals))
        assert sent.status == 201, await sent.text()
        read = await _get(client, f"/v1/messages/{(await sent.json())['id']}", physician(portals))
        assert read["body"] == body

    refused = [
        "a" * (KIB_64 + 1),  # 65,537 bytes
        "a" * (KIB_64 - 1) + "é",  # 65,536 characters, 65,537 bytes
        "é" * (KIB_64 // 2 + 1),  # 32,769 characters, 65,538 bytes
        "€" * 21_846,  # 21,846 characters, 65,538 bytes
    ]
    for body in refused:
        assert len(body.encode()) > KIB_64
        response = await client.post(url, json={"body": body}, headers=patient(portals))
        assert response.status == 422, (len(body), len(body.encode()))
        problem = await response.json()
        assert problem["type"] == "urn:bedside:problem:validation-failed"
        assert [e["loc"] for e in problem["errors"]] == [["body"]]
    assert await _messages_stored(database.owner, created["id"]) == len(accepted)
    listed = await _get(client, url, physician(portals))
    assert [len(m["body"].encode()) for m in listed["items"]] == [KIB_64, KIB_64]


async def test_a_first_message_over_64_kib_creates_no_thread(client: Client, portals: Portals, database: Dsns) -> None:
    await consent(client, portals)
    body = {
        "patient": "Patient/1",
        "participants": ["Practitioner/7"],
        "subject": "Too long",
        "message": {"body": "a" * (KIB_64 - 1) + "é"},  # 65,536 characters, 65,537 bytes
    }
    response = await client.post("/v1/threads", json=body, headers=patient(portals))
    assert response.status == 422
    assert await owner_count(database.owner, "SELECT count(*) FROM threads") == 0
    assert await owner_count(database.owner, "SELECT count(*) FROM messages") == 0


async def test_a_thread_has_at_most_20_participants(client: Client, portals: Portals, database: Dsns) -> None:
    team = [f"Practitioner/{n}" for n in range(1, 22)]
    for member in team:
        await consent(client, portals, grantee=member)
    largest = await thread(client, portals, participants=team[:20])
    assert largest["participants"] == sorted(team[:20])
    body = {"patient": "Patient/1", "participants": team, "subject": "One too many"}
    response = await client.post("/v1/threads", json=body, headers=patient(portals))
    assert response.status == 422
    assert [e["loc"] for e in (await response.json())["errors"]] == [["participants"]]
    assert await owner_count(database.owner, "SELECT count(*) FROM threads") == 1


# -- thread listing ------------------------------------------------------------------------------------


async def _threads_of_two_patients(client: Client, portals: Portals) -> dict[str, str]:
    """Four threads of Practitioner/7: Patient/1's and Patient/2's, one open and one closed each."""
    ids = {}
    for n in (1, 2):
        await consent(client, portals, n=n)
        for status in ("open", "closed"):
            created = await thread(client, portals, n=n, message=None)
            ids[f"{n}-{status}"] = created["id"]
            if status == "closed":
                closed = await client.post(f"/v1/threads/{created['id']}/close", headers=physician(portals))
                assert closed.status == 200
    return ids


async def _listed(client: Client, headers: dict[str, str], **params: str | int) -> set[str]:
    page = await _get(client, "/v1/threads", headers, **params)
    assert page["next_cursor"] is None
    if "status" in params:
        assert {t["status"] for t in page["items"]} <= {params["status"]}
    if "patient" in params:
        assert {t["patient"] for t in page["items"]} <= {params["patient"]}
    return {t["id"] for t in page["items"]}


async def test_threads_filter_by_status_and_patient(client: Client, portals: Portals) -> None:
    ids = await _threads_of_two_patients(client, portals)
    doctor = physician(portals)
    assert await _listed(client, doctor) == set(ids.values())
    assert await _listed(client, doctor, status="open") == {ids["1-open"], ids["2-open"]}
    assert await _listed(client, doctor, status="closed") == {ids["1-closed"], ids["2-closed"]}
    assert await _listed(client, doctor, patient="Patient/2") == {ids["2-open"], ids["2-closed"]}
    assert await _listed(client, doctor, patient="Patient/1", status="closed") == {ids["1-closed"]}
    assert await _listed(client, doctor, patient="Patient/3") == set()

    # A patient's filter cannot reach another patient's threads.
    assert await _listed(client, patient(portals, 1), patient="Patient/2") == set()
    assert await _listed(client, patient(portals, 2), status="open") == {ids["2-open"]}

    refused = await client.get("/v1/threads", params={"status": "archived"}, headers=doctor)
    assert refused.status == 422
    assert [e["loc"] for e in (await refused.json())["errors"]] == [["status"]]


async def test_thread_listing_limit_is_1_to_100(client: Client, portals: Portals) -> None:
    ids = await _threads_of_two_patients(client, portals)
    doctor = physician(portals)
    for limit in ("0", "101", "-1"):
        response = await client.get("/v1/threads", params={"limit": limit}, headers=doctor)
        assert response.status == 422, limit
        assert [e["loc"] for e in (await response.json())["errors"]] == [["limit"]]
    assert await _listed(client, doctor, limit=100) == set(ids.values())

    pages: list[list[str]] = []
    cursor = None
    for _ in range(6):  # bounded: a cursor that cycles must fail the test, not hang it
        params = {"limit": "1", **({"cursor": cursor} if cursor else {})}
        page = await _get(client, "/v1/threads", doctor, **params)
        pages.append([t["id"] for t in page["items"]])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [len(p) for p in pages] == [1, 1, 1, 1]
    assert {i for p in pages for i in p} == set(ids.values())


# -- message paging ----------------------------------------------------------------------------------


async def test_messages_page_backwards_with_before_in_ascending_order(client: Client, portals: Portals) -> None:
    await consent(client, portals)
    created = await thread(client, portals, message="m1")
    url = f"/v1/threads/{created['id']}/messages"
    for i in range(2, 11):
        assert (await client.post(url, json={"body": f"m{i}"}, headers=patient(portals))).status == 201
    doctor = physician(portals)

    def seqs(page: dict[str, Any]) -> list[int]:
        assert [m["body"] for m in page["items"]] == [f"m{m['seq']}" for m in page["items"]]
        return [m["seq"] for m in page["items"]]

    # Each page is in ascending sequence; `before` gives the latest `limit` below it.
    assert seqs(await _get(client, url, doctor, limit=3)) == [8, 9, 10]
    assert seqs(await _get(client, url, doctor, before=8, limit=3)) == [5, 6, 7]
    assert seqs(await _get(client, url, doctor, before=3, limit=3)) == [1, 2]
    assert seqs(await _get(client, url, doctor, before=1)) == []
    assert seqs(await _get(client, url, doctor, after=2, before=6)) == [3, 4, 5]
    assert seqs(await _get(client, url, doctor, after=2, before=9, limit=2)) == [3, 4]

    walked, before = [], None
    for _ in range(10):  # bounded
        page = seqs(await _get(client, url, doctor, limit=4, **({"before": before} if before else {})))
        if not page:
            break
        walked.append(page)
        before = page[0]
    assert walked == [[7, 8, 9, 10], [3, 4, 5, 6], [1, 2]]


async def test_a_message_page_holds_at_most_200(client: Client, portals: Portals) -> None:
    await consent(client, portals)
    created = await thread(client, portals, message="only")
    url = f"/v1/threads/{created['id']}/messages"
    assert [m["seq"] for m in (await _get(client, url, patient(portals), limit=200))["items"]] == [1]
    for limit in ("201", "0"):
        response = await client.get(url, params={"limit": limit}, headers=patient(portals))
        assert response.status == 422, limit
        problem = await response.json()
        assert problem["type"] == "urn:bedside:problem:validation-failed"
        assert [e["loc"] for e in problem["errors"]] == [["limit"]]


# -- consent ---------------------------------------------------------------------------------------------


async def test_a_thread_refused_for_want_of_consent_is_audited(
    client: Client, portals: Portals, database: Dsns
) -> None:
    body = {"patient": "Patient/1", "participants": ["Practitioner/7", "Practitioner/8"], "subject": "Hi"}
    refused = await client.post("/v1/threads", json=body, headers=patient(portals))
    assert refused.status == 403
    assert (await refused.json())["type"] == "urn:bedside:problem:consent-required"

    grant = await consent(client, portals, grantee="Practitioner/7")  # one of the two only
    refused = await client.post("/v1/threads", json=body, headers=patient(portals))
    assert refused.status == 403
    assert (await refused.json())["code"] == "consent-required"

    denials = await audit_events(database.owner, "action = 'thread:create' AND outcome = 'denied'")
    assert [(e["actor"], e["patient"], e["resource_type"]) for e in denials] == [
        ("Patient/1", "Patient/1", "Thread"),
        ("Patient/1", "Patient/1", "Thread"),
    ]
    details = [json.loads(e["details"]) for e in denials]
    assert all(d["consent_decision"] == "deny" and d["reason"] == "consent-required" for d in details)
    assert all("no-consent" in d["consent_reasons"] for d in details)
    assert [d["consent_ids"] for d in details] == [[], [grant["id"]]]
    assert await owner_count(database.owner, "SELECT count(*) FROM threads") == 0
    assert await audit_events(database.owner, "action = 'thread:create' AND outcome = 'success'") == []


async def test_a_thread_and_its_first_message_are_audited_with_the_consents_that_permitted_them(
    client: Client, portals: Portals, database: Dsns
) -> None:
    seven = await consent(client, portals, grantee="Practitioner/7")
    eight = await consent(client, portals, grantee="Practitioner/8")
    created = await thread(client, portals, participants=["Practitioner/7", "Practitioner/8"], message="Hi")

    (made,) = await audit_events(database.owner, "action = 'thread:create' AND outcome = 'success'")
    (sent,) = await audit_events(database.owner, "action = 'message:send' AND outcome = 'success'")
    assert (made["actor"], made["patient"], made["resource_type"], made["resource_id"]) == (
        "Patient/1",
        "Patient/1",
        "Thread",
        created["id"],
    )
    assert (sent["actor"], sent["patient"], sent["resource_type"], sent["resource_id"]) == (
        "Patient/1",
        "Patient/1",
        "Message",
        created["message"]["id"],
    )
    permitted = {
        "consent_decision": "permit",
        "consent_ids": [seven["id"], eight["id"]],
        "consent_reasons": ["granted"],
    }
    assert json.loads(made["details"]) == permitted
    assert json.loads(sent["details"]) == {"thread_id": created["id"], **permitted}


# -- receipts and unread counts ------------------------------------------------------------------------


async def _unread(client: Client, headers: dict[str, str]) -> dict[str, int]:
    page = await _get(client, "/v1/threads", headers)
    return {t["id"]: t["unread"] for t in page["items"]}


async def test_receipts_are_seen_by_the_other_participants_and_unread_counts_are_per_reader(
    client: Client, portals: Portals
) -> None:
    await consent(client, portals, grantee="Practitioner/7")
    await consent(client, portals, grantee="Practitioner/8")
    created = await thread(client, portals, participants=["Practitioner/7", "Practitioner/8"], message="from patient")
    url = f"/v1/threads/{created['id']}"
    for body in ("from 7, one", "from 7, two"):
        assert (await client.post(f"{url}/messages", json={"body": body}, headers=physician(portals))).status == 201
    me, seven, eight = patient(portals), physician(portals, 7), physician(portals, 8)

    # Unread: the others' messages after the reader's own receipt.
    assert await _unread(client, me) == {created["id"]: 2}
    assert await _unread(client, seven) == {created["id"]: 1}
    assert await _unread(client, eight) == {created["id"]: 3}

    receipt = await client.post(f"{url}/read", json={"up_to": 3}, headers=me)
    assert receipt.status == 200
    posted = await receipt.json()
    assert (posted["reader"], posted["up_to"]) == ("Patient/1", 3)
    for other in (seven, eight):
        detail = await _get(client, url, other)
        assert [(r["reader"], r["up_to"], r["read_at"]) for r in detail["receipts"]] == [
            ("Patient/1", 3, posted["read_at"])
        ]
    # The patient's receipt is the patient's alone.
    assert await _unread(client, me) == {created["id"]: 0}
    assert await _unread(client, seven) == {created["id"]: 1}
    assert await _unread(client, eight) == {created["id"]: 3}

    assert (await client.post(f"{url}/read", json={"up_to": 2}, headers=eight)).status == 200
    assert await _unread(client, eight) == {created["id"]: 1}
    assert await _unread(client, seven) == {created["id"]: 1}
    detail = await _get(client, url, me)
    assert [(r["reader"], r["up_to"]) for r in detail["receipts"]] == [("Patient/1", 3), ("Practitioner/8", 2)]


async def test_a_receipt_is_audited_with_its_reader_and_how_far_it_reaches(
    client: Client, portals: Portals, database: Dsns
) -> None:
    await consent(client, portals)
    created = await thread(client, portals, message="from patient")
    url = f"/v1/threads/{created['id']}"
    assert (await client.post(f"{url}/messages", json={"body": "reply"}, headers=physician(portals))).status == 201
    assert (await client.post(f"{url}/read", json={"up_to": 2}, headers=patient(portals))).status == 200
    assert (await client.post(f"{url}/read", json={"up_to": 1}, headers=physician(portals))).status == 200

    events = await audit_events(database.owner, "action = 'receipt:mark'")
    assert [(e["actor"], e["patient"], e["resource_id"], json.loads(e["details"])["up_to"]) for e in events] == [
        ("Patient/1", "Patient/1", created["id"], 2),
        ("Practitioner/7", "Patient/1", created["id"], 1),
    ]


# -- replies -------------------------------------------------------------------------------------------


async def test_a_reply_names_a_message_of_its_own_thread(client: Client, portals: Portals, database: Dsns) -> None:
    await consent(client, portals)
    first = await thread(client, portals, message="first thread")
    second = await thread(client, portals, message="second thread")
    url = f"/v1/threads/{second['id']}/messages"
    for foreign in (first["message"]["id"], str(uuid.uuid4())):
        body = {"body": "a reply", "in_reply_to": foreign}
        refused = await client.post(url, json=body, headers=physician(portals))
        assert refused.status == 422, foreign
        assert [e["loc"] for e in (await refused.json())["errors"]] == [["in_reply_to"]]
    assert await _messages_stored(database.owner, second["id"]) == 1

    body = {"body": "a reply", "in_reply_to": second["message"]["id"]}
    reply = await client.post(url, json=body, headers=physician(portals))
    assert reply.status == 201
    assert (await reply.json())["in_reply_to"] == second["message"]["id"]


# -- pagination under concurrent writers ---------------------------------------------------------------


async def test_pages_stay_whole_while_four_writers_send_at_once(client: Client, portals: Portals) -> None:
    await consent(client, portals)
    created = await thread(client, portals, message=None)
    url = f"/v1/threads/{created['id']}/messages"
    writers = [patient(portals), physician(portals), patient(portals), physician(portals)]
    per_writer = 25

    async def write(w: int) -> None:
        for i in range(per_writer):
            sent = await client.post(url, json={"body": f"w{w}-{i}"}, headers=writers[w])
            assert sent.status == 201, await sent.text()

    pages_while_writing = 0

    async def read() -> list[dict[str, Any]]:
        nonlocal pages_while_writing
        seen: list[dict[str, Any]] = []
        after = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60  # a bound on time, not on pages: CI may be slow
        while loop.time() < deadline:
            finished = writing.done()  # read before the page: an empty page after the last write ends it
            page = await _get(client, url, patient(portals), after=after, limit=7)
            seen += page["items"]
            if page["items"]:
                after = page["items"][-1]["seq"]
                pages_while_writing += not writing.done()
            elif finished:
                return seen
            else:
                await asyncio.sleep(0.005)
        raise AssertionError("the writers did not finish")

    writing = asyncio.ensure_future(asyncio.gather(*(write(w) for w in range(len(writers)))))
    seen = await read()
    await writing

    assert pages_while_writing >= 2  # the reader really paged while the writers wrote
    total = len(writers) * per_writer
    assert [m["seq"] for m in seen] == list(range(1, total + 1))  # no gap, no repeat, in order
    sent = {f"w{w}-{i}" for w in range(len(writers)) for i in range(per_writer)}
    assert sorted(m["body"] for m in seen) == sorted(sent)
    final = await _get(client, url, physician(portals), limit=200)
    assert [m["seq"] for m in final["items"]] == list(range(1, total + 1))
    assert [m["id"] for m in final["items"]] == [m["id"] for m in seen]
    # Each writer's messages are in the order it sent them.
    for w in range(len(writers)):
        mine = [m["body"] for m in seen if m["body"].startswith(f"w{w}-")]
        assert mine == [f"w{w}-{i}" for i in range(per_writer)]
