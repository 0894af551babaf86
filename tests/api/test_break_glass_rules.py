"""Break-glass as the issue specifies it: a reason of 10 to 500 characters, a grant that lasts the
configured time (60 minutes by default), audited as `break_glass:open` with purpose of use ETREAT, and
listed for compliance as not reviewed until it is reviewed."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from service.settings import Settings
from tests.api.messaging_helpers import consent, patient, physician, thread
from tests.conftest import Dsns, Portals
from tests.support import audit_events, owner_count

Client = TestClient[web.Request, web.Application]

REASON = "Unconscious in the ED, need history"


@pytest.fixture
def settings(settings: Settings, request: pytest.FixtureRequest) -> Settings:
    """The suite's settings, with a test's own overrides (`parametrize("settings", [...], indirect=True)`)."""
    return settings.model_copy(update=getattr(request, "param", {}))


def _compliance(portals: Portals) -> dict[str, str]:
    return portals.acme.auth(role="compliance", sub="Practitioner/c1")


async def _grants(client: Client, portals: Portals, reviewed: str | None = None) -> list[dict[str, Any]]:
    params = {} if reviewed is None else {"reviewed": reviewed}
    response = await client.get("/v1/audit/break-glass", params=params, headers=_compliance(portals))
    assert response.status == 200, await response.text()
    items: list[dict[str, Any]] = (await response.json())["items"]
    return items


async def _open(client: Client, portals: Portals, thread_id: str, reason: str, n: int = 99) -> int:
    headers = {**physician(portals, n=n), "Break-Glass-Reason": reason}
    return (await client.get(f"/v1/threads/{thread_id}", headers=headers)).status


async def test_an_opening_is_audited_with_purpose_of_use_etreat(
    client: Client, portals: Portals, database: Dsns
) -> None:
    await consent(client, portals)
    created = await thread(client, portals, message="chest pain since this morning")
    assert await _open(client, portals, created["id"], REASON) == 200

    (grant,) = await _grants(client, portals)
    (event,) = await audit_events(database.owner, "action = 'break_glass:open'")
    assert (event["outcome"], event["purpose"]) == ("success", "ETREAT")
    assert (event["actor"], event["actor_role"], event["patient"]) == ("Practitioner/99", "physician", "Patient/1")
    assert (event["resource_type"], event["resource_id"]) == ("Thread", created["id"])
    details = json.loads(event["details"])
    assert details["grant_id"] == grant["id"]
    assert datetime.fromisoformat(details["expires_at"]) == datetime.fromisoformat(grant["expires_at"])
    assert REASON not in event["details"]  # the reason is sealed with the patient's key, never audited
    # The reads the grant allows carry the same purpose of use.
    reads = await audit_events(database.owner, "action = 'thread:read' AND actor = 'Practitioner/99'")
    assert [r["purpose"] for r in reads] == ["ETREAT"]


@pytest.mark.parametrize(
    ("settings", "minutes"), [({}, 60), ({"break_glass_minutes": 5}, 5)], indirect=["settings"], ids=["default", "set"]
)
async def test_a_grant_lasts_as_configured_sixty_minutes_by_default(
    client: Client, portals: Portals, database: Dsns, minutes: int
) -> None:
    await consent(client, portals)
    created = await thread(client, portals)
    assert await _open(client, portals, created["id"], REASON) == 200
    (grant,) = await _grants(client, portals)
    lasts = datetime.fromisoformat(grant["expires_at"]) - datetime.fromisoformat(grant["opened_at"])
    assert lasts == timedelta(minutes=minutes)
    (event,) = await audit_events(database.owner, "action = 'break_glass:open'")
    assert datetime.fromisoformat(json.loads(event["details"])["expires_at"]) == datetime.fromisoformat(
        grant["expires_at"]
    )


async def test_a_reason_must_be_10_to_500_characters(client: Client, portals: Portals, database: Dsns) -> None:
    await consent(client, portals)
    created = await thread(client, portals, message="chest pain since this morning")
    for refused in ("x" * 9, "x" * 501):
        response = await client.get(
            f"/v1/threads/{created['id']}", headers={**physician(portals, n=99), "Break-Glass-Reason": refused}
        )
        assert response.status == 422, len(refused)
        problem = await response.json()
        assert problem["type"] == "urn:bedside:problem:validation-failed"
        assert [e["loc"] for e in problem["errors"]] == [["Break-Glass-Reason"]]
        assert refused not in await response.text()
    assert await owner_count(database.owner, "SELECT count(*) FROM break_glass") == 0
    assert await audit_events(database.owner, "action = 'break_glass:open'") == []
    # Still an outsider: no grant came of the refused reasons.
    assert (await client.get(f"/v1/threads/{created['id']}/messages", headers=physician(portals, n=99))).status == 404

    shortest, longest = "y" * 10, "z" * 500
    assert await _open(client, portals, created["id"], shortest, n=98) == 200
    assert await _open(client, portals, created["id"], longest, n=99) == 200
    grants = await _grants(client, portals)
    assert sorted((g["physician"], g["reason"]) for g in grants) == [
        ("Practitioner/98", shortest),
        ("Practitioner/99", longest),
    ]


async def test_a_malformed_reason_is_refused_also_when_no_grant_would_open(client: Client, portals: Portals) -> None:
    await consent(client, portals)
    created = await thread(client, portals, message="chest pain since this morning")
    assert await _open(client, portals, created["id"], REASON) == 200  # Practitioner/99's grant runs now
    participant = physician(portals)  # Practitioner/7, in the thread
    for headers in (physician(portals, n=99), participant):
        for path in (f"/v1/threads/{created['id']}", f"/v1/threads/{created['id']}/messages"):
            response = await client.get(path, headers={**headers, "Break-Glass-Reason": "too short"})
            assert response.status == 422, path
            assert [e["loc"] for e in (await response.json())["errors"]] == [["Break-Glass-Reason"]]
    assert len(await _grants(client, portals)) == 1


async def test_a_reason_is_percent_encoded_utf8_and_reviewed_as_written(client: Client, portals: Portals) -> None:
    await consent(client, portals)
    created = await thread(client, portals, message="found unconscious")
    reason = "Schädeltrauma, bewusstlos: 100% dringend"
    assert await _open(client, portals, created["id"], reason) == 422  # raw UTF-8: refused, never stored garbled
    assert await _open(client, portals, created["id"], "Patient %FF unconscious") == 422  # escapes not UTF-8
    assert await _grants(client, portals) == []
    assert await _open(client, portals, created["id"], quote(reason)) == 200
    assert [g["reason"] for g in await _grants(client, portals)] == [reason]


async def test_a_grant_is_listed_not_reviewed_then_reviewed(client: Client, portals: Portals, database: Dsns) -> None:
    await consent(client, portals)
    created = await thread(client, portals)
    assert await _open(client, portals, created["id"], REASON) == 200

    (pending,) = await _grants(client, portals, reviewed="false")
    assert (pending["thread_id"], pending["physician"], pending["reason"]) == (
        created["id"],
        "Practitioner/99",
        REASON,
    )
    assert (pending["reviewed"], pending["reviewed_at"], pending["reviewed_by"]) == (False, None, None)
    assert await _grants(client, portals, reviewed="true") == []

    done = await client.post(f"/v1/audit/break-glass/{pending['id']}/review", headers=_compliance(portals))
    assert done.status == 204

    assert await _grants(client, portals, reviewed="false") == []
    (reviewed,) = await _grants(client, portals, reviewed="true")
    assert (reviewed["id"], reviewed["reviewed"], reviewed["reviewed_by"]) == (pending["id"], True, "Practitioner/c1")
    assert reviewed["reviewed_at"] is not None
    assert [g["reviewed"] for g in await _grants(client, portals)] == [True]
    (event,) = await audit_events(database.owner, "action = 'break_glass:review'")
    assert (event["actor"], event["resource_id"]) == ("Practitioner/c1", pending["id"])


async def test_every_grant_is_reachable_a_page_at_a_time(client: Client, portals: Portals) -> None:
    await consent(client, portals)
    created = await thread(client, portals, message="found unconscious")
    for n in range(90, 95):
        assert await _open(client, portals, created["id"], REASON, n=n) == 200
    seen: list[str] = []
    cursor = None
    for _ in range(5):  # bounded: a cursor that cycles fails the test instead of hanging it
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        response = await client.get("/v1/audit/break-glass", params=params, headers=_compliance(portals))
        assert response.status == 200
        page = await response.json()
        seen += [g["physician"] for g in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"Practitioner/{n}" for n in range(94, 89, -1)]  # newest first, each once
    forged = await client.get(
        "/v1/audit/break-glass", params={"cursor": "bm90LWEtY3Vyc29y"}, headers=_compliance(portals)
    )
    assert forged.status == 422


async def test_only_a_physician_outside_the_thread_opens_a_grant(
    client: Client, portals: Portals, database: Dsns
) -> None:
    await consent(client, portals)
    created = await thread(client, portals, message="chest pain since this morning")
    # Staff and patients cannot break the glass: a reason gets them no grant, and no content.
    for who in (portals.acme.auth(role="staff", sub="Practitioner/nurse"), patient(portals, n=2)):
        for path in (f"/v1/threads/{created['id']}", f"/v1/threads/{created['id']}/messages"):
            response = await client.get(path, headers={**who, "Break-Glass-Reason": REASON})
            assert response.status == 404, path
            assert "chest pain" not in await response.text()
    assert await _grants(client, portals) == []
    assert await audit_events(database.owner, "action = 'break_glass:open'") == []

    # A participant needs no grant, and a physician whose grant still runs gets no second one.
    participant = {**physician(portals), "Break-Glass-Reason": REASON}
    answer = await client.get(f"/v1/threads/{created['id']}", headers=participant)
    assert (answer.status, (await answer.json())["access"]) == (200, "write")
    assert await _open(client, portals, created["id"], REASON) == 200
    assert await _open(client, portals, created["id"], "Still unconscious, reading on") == 200
    assert [g["physician"] for g in await _grants(client, portals)] == ["Practitioner/99"]
    assert len(await audit_events(database.owner, "action = 'break_glass:open'")) == 1


async def test_a_reason_with_a_control_character_is_refused(client: Client, portals: Portals) -> None:
    await consent(client, portals)
    created = await thread(client, portals, message="found unconscious")
    assert await _open(client, portals, created["id"], quote("Unconscious in the ED,\nneed history")) == 422
    assert await _grants(client, portals) == []


async def test_a_grant_reads_with_purpose_etreat_and_leaves_no_receipt(
    client: Client, portals: Portals, database: Dsns
) -> None:
    await consent(client, portals)
    created = await thread(client, portals, message="chest pain since this morning")
    assert await _open(client, portals, created["id"], REASON) == 200
    outsider = physician(portals, n=99)
    page = await client.get(f"/v1/threads/{created['id']}/messages", headers=outsider)
    assert page.status == 200
    reads = await audit_events(database.owner, "action = 'message:read' AND actor = 'Practitioner/99'")
    assert [r["purpose"] for r in reads] == ["ETREAT"]

    # Reading under break-glass is not reading as a participant: no receipt, so the sender may still recall.
    marked = await client.post(f"/v1/threads/{created['id']}/read", json={"up_to": 1}, headers=outsider)
    assert marked.status == 404
    recalled = await client.post(f"/v1/messages/{created['message']['id']}/recall", headers=patient(portals))
    assert recalled.status == 200
