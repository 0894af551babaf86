"""Each send decides on the thread, the caller's teams, the consent ledger and the patient's key as they
are at that moment, read in one statement: these are the refusals that statement must keep making."""

from __future__ import annotations

import asyncio
import json

import asyncpg

from tests.api.messaging_helpers import consent, patient, physician, thread
from tests.conftest import Dsns, Portals
from tests.support import audit_events


async def _messages(owner: asyncpg.Connection, thread_id: str) -> int:
    return int(await owner.fetchval("SELECT count(*) FROM messages WHERE thread_id = $1::uuid", thread_id))


async def test_a_send_that_waits_for_a_shred_is_refused_and_writes_nothing(
    client, portals: Portals, database: Dsns
) -> None:
    await consent(client, portals)
    created = await thread(client, portals)
    url = f"/v1/threads/{created['id']}/messages"
    owner = await asyncpg.connect(database.owner)
    shredder = await asyncpg.connect(database.owner)
    try:
        # A shred in progress: the key row stamped, its wraps deleted, not yet committed.
        shred = shredder.transaction()
        await shred.start()
        dek_id = await shredder.fetchval(
            "UPDATE data_keys SET shredded_at = now(), shredded_by = 'Practitioner/admin' "
            "WHERE patient = 'Patient/1' RETURNING id"
        )
        await shredder.execute("DELETE FROM data_key_wraps WHERE dek_id = $1", dek_id)

        sending = asyncio.create_task(client.post(url, json={"body": "just in time?"}, headers=patient(portals)))
        for _ in range(200):  # until the send waits for the key row's lock
            waiting = await owner.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            if waiting:
                break
            await asyncio.sleep(0.025)
        assert waiting
        assert not sending.done()
        await shred.commit()

        refused = await sending
        assert refused.status == 410
        assert await _messages(owner, created["id"]) == 1  # only the thread's first message
    finally:
        await shredder.close()
        await owner.close()


async def test_a_shredded_key_takes_no_new_messages(client, portals: Portals, database: Dsns) -> None:
    await consent(client, portals)
    created = await thread(client, portals)
    admin = portals.acme.auth(role="admin", sub="Practitioner/admin")
    shred = await client.post(
        "/v1/admin/keys/shred", json={"patient": "Patient/1", "confirm": "Patient/1"}, headers=admin
    )
    assert shred.status == 200
    for who in (patient(portals), physician(portals)):
        refused = await client.post(f"/v1/threads/{created['id']}/messages", json={"body": "more"}, headers=who)
        assert refused.status == 410
    owner = await asyncpg.connect(database.owner)
    try:
        assert await _messages(owner, created["id"]) == 1
    finally:
        await owner.close()


async def test_every_participant_needs_a_consent_in_force_now(client, portals: Portals, database: Dsns) -> None:
    admin = portals.acme.auth(role="admin", sub="Practitioner/admin")
    team = {"team": "CareTeam/cardio", "members": ["Practitioner/8"]}
    assert (await client.post("/v1/admin/care-teams", json=team, headers=admin)).status == 201
    await consent(client, portals)
    await consent(client, portals, grantee="CareTeam/cardio")
    created = await thread(client, portals, participants=["Practitioner/7", "CareTeam/cardio"])
    url = f"/v1/threads/{created['id']}/messages"
    assert (await client.post(url, json={"body": "both consented"}, headers=patient(portals))).status == 201

    owner = await asyncpg.connect(database.owner)
    try:  # the team's consent runs out; the practitioner's still holds
        await owner.execute(
            "UPDATE consent_state SET valid_until = now() - interval '1 second' WHERE grantee = 'CareTeam/cardio'"
        )
        for who in (patient(portals), physician(portals)):
            refused = await client.post(url, json={"body": "one expired"}, headers=who)
            assert refused.status == 403
            assert (await refused.json())["code"] == "consent-required"
        denials = await audit_events(database.owner, "action = 'message:send' AND outcome = 'denied'")
        assert len(denials) == 2
        assert all("expired" in json.loads(r["details"])["consent_reasons"] for r in denials)
        assert await _messages(owner, created["id"]) == 2
    finally:
        await owner.close()


async def test_care_team_members_send_and_read_through_their_team_until_they_leave(client, portals: Portals) -> None:
    admin = portals.acme.auth(role="admin", sub="Practitioner/admin")
    team = {"team": "CareTeam/cardio", "members": ["Practitioner/7", "Practitioner/8"]}
    assert (await client.post("/v1/admin/care-teams", json=team, headers=admin)).status == 201
    await consent(client, portals, grantee="CareTeam/cardio")
    created = await thread(client, portals, participants=["CareTeam/cardio"])
    url = f"/v1/threads/{created['id']}/messages"
    nurse = portals.acme.auth(role="staff", sub="Practitioner/8")
    for who, sender in ((nurse, "Practitioner/8"), (physician(portals), "Practitioner/7")):
        assert (await client.post(url, json={"body": f"from {sender}"}, headers=who)).status == 201
        page = await client.get(url, params={"limit": 1}, headers=who)
        assert [(m["sender"], m["body"]) for m in (await page.json())["items"]] == [(sender, f"from {sender}")]

    members = {"members": ["Practitioner/7"]}
    assert (await client.put("/v1/admin/care-teams/cardio/members", json=members, headers=admin)).status == 200
    assert (await client.post(url, json={"body": "after leaving"}, headers=nurse)).status == 404
    assert (await client.get(url, headers=nurse)).status == 404
    assert (await client.post(url, json={"body": "still a member"}, headers=physician(portals))).status == 201


async def test_an_expired_idempotency_key_is_claimed_anew(client, portals: Portals, database: Dsns) -> None:
    await consent(client, portals)
    created = await thread(client, portals, message=None)
    url = f"/v1/threads/{created['id']}/messages"
    headers = {**patient(portals), "Idempotency-Key": "reused-tomorrow"}
    first = await client.post(url, json={"body": "today"}, headers=headers)
    assert first.status == 201
    assert (await client.post(url, json={"body": "other"}, headers=headers)).status == 422
    owner = await asyncpg.connect(database.owner)
    try:
        await owner.execute("UPDATE idempotency_keys SET expires_at = now() - interval '1 second'")
    finally:
        await owner.close()
    second = await client.post(url, json={"body": "tomorrow"}, headers=headers)
    assert second.status == 201
    assert "Idempotent-Replayed" not in second.headers
    assert (await second.json())["id"] != (await first.json())["id"]
    replay = await client.post(url, json={"body": "tomorrow"}, headers=headers)
    assert replay.headers.get("Idempotent-Replayed") == "true"
    assert (await replay.json())["id"] == (await second.json())["id"]
