"""The admin's side of webhook endpoints: registering (and what is refused), secrets shown once and kept
only sealed, the URL sealed too but shown to the admin, listing, changing, rotating, deleting, and who
may do any of it (the authorization matrix covers every role and route; here only the short story)."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import uuid
from datetime import datetime
from typing import Any

import asyncpg
import pytest
from standardwebhooks import Webhook
from structlog.testing import capture_logs

from service.embedded import find_pg_bindir
from service.logs import redacting_processors
from service.settings import Settings
from tests.api.messaging_helpers import consent, patient, thread
from tests.api.webhook_helpers import ADMIN, Receiver, admin_get, register, wait_for_delivery
from tests.conftest import Dsns, Portals
from tests.support import canary

ENDPOINTS = "/v1/admin/webhook-endpoints"
PUBLIC_URL = "https://93.184.215.14/hook"  # an IP literal in a public range: nothing to resolve
ALL_EVENTS = ["message.created", "thread.created", "message.recalled", "consent.revoked"]


def admin(portals: Portals) -> dict[str, str]:
    return portals.acme.auth(**ADMIN)


def endpoint_body(url: str = PUBLIC_URL, **changes: Any) -> dict[str, Any]:
    return {"subscriber": "Practitioner/7", "url": url, "event_types": ["message.created"], **changes}


async def pg_dump(database: Dsns) -> bytes:
    done = await asyncio.to_thread(
        subprocess.run,
        [str(find_pg_bindir() / "pg_dump"), "--dbname", database.owner, "--data-only"],
        capture_output=True,
        check=True,
        timeout=120,
    )
    assert len(done.stdout) > 10_000  # a real dump, with the ciphertext in it
    return done.stdout


def secret_forms(secret: str) -> list[bytes]:
    """A `whsec_`/`whsk_` secret as text, its base64 alone, and its key bytes as pg_dump shows bytea."""
    encoded = secret.split("_", 1)[1]
    return [secret.encode(), encoded.encode(), base64.b64decode(encoded).hex().encode()]


# -- registering ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"event_types": ["message.created", "message.deleted"]}, "event_types"),
        ({"event_types": []}, "event_types"),
        ({"subscriber": "Patient/1"}, "subscriber"),
        ({"subscriber": "RelatedPerson/mum"}, "subscriber"),
        ({"subscriber": "Practitioner/"}, "subscriber"),
        ({"url": "not a url"}, "url"),
        ({"url": "https://"}, "url"),
        ({"url": "https://user:pw@93.184.215.14/hook"}, "url"),
        ({"url": "https://93.184.215.14/hook#frag"}, "url"),
        ({"url": "ftp://93.184.215.14/hook"}, "url"),
        ({"url": "https://10.0.0.8/hook"}, "url"),
        ({"url": "https://169.254.169.254/latest/meta-data"}, "url"),
    ],
    ids=[
        "unknown-event",
        "no-events",
        "patient",
        "related-person",
        "empty-reference",
        "not-a-url",
        "no-host",
        "userinfo",
        "fragment",
        "ftp",
        "private-address",
        "metadata-address",
    ],
)
async def test_registration_refuses_what_it_cannot_use(client, portals: Portals, change: dict, field: str) -> None:
    response = await client.post(ENDPOINTS, json=endpoint_body(**change), headers=admin(portals))

    assert response.status == 422, await response.text()
    problem = await response.json()
    assert field in {str(e["loc"][0]) for e in problem["errors"]}, problem
    assert (await admin_get(client, portals, ENDPOINTS))["items"] == []


class TestWithoutTheDevelopmentSwitch:
    @pytest.fixture
    def settings(self, settings: Settings) -> Settings:
        return settings.model_copy(update={"webhook_allow_http_loopback": False})

    async def test_http_to_loopback_is_an_unsafe_url(self, client, portals: Portals, receiver: Receiver) -> None:
        for url in (receiver.url, f"https://127.0.0.1:{receiver.port}/hook"):
            response = await client.post(ENDPOINTS, json=endpoint_body(url), headers=admin(portals))

            assert response.status == 422, await response.text()
            assert (await response.json())["code"] == "unsafe-url"
        assert (await admin_get(client, portals, ENDPOINTS))["items"] == []


async def test_with_the_development_switch_http_goes_to_loopback_only(client, portals: Portals) -> None:
    refused = await client.post(ENDPOINTS, json=endpoint_body("http://93.184.215.14/hook"), headers=admin(portals))
    assert refused.status == 422
    assert (await refused.json())["code"] == "unsafe-url"
    accepted = await client.post(ENDPOINTS, json=endpoint_body("http://127.0.0.1:9/hook"), headers=admin(portals))
    assert accepted.status == 201, await accepted.text()


# -- secrets and the URL ------------------------------------------------------------------------------


async def test_secrets_are_shown_once_and_never_again(client, portals: Portals, receiver: Receiver) -> None:
    created = await register(client, portals, receiver.url, ed25519=True)
    secrets = created["secrets"]
    assert secrets["outbound_secret"].startswith("whsec_")
    assert secrets["inbound_secret"].startswith("whsec_")
    assert secrets["outbound_secret"] != secrets["inbound_secret"]
    assert len(base64.b64decode(secrets["outbound_secret"].removeprefix("whsec_"))) == 32
    assert secrets["signing_public_key"].startswith("whpk_")
    endpoint_id = created["endpoint"]["id"]
    await consent(client, portals)
    await thread(client, portals)
    await wait_for_delivery(client, portals, endpoint_id, lambda items: len(items) >= 2)
    delivery_id = (await admin_get(client, portals, f"{ENDPOINTS}/{endpoint_id}/deliveries"))["items"][0]["id"]

    texts = []
    for path in (
        ENDPOINTS,
        f"{ENDPOINTS}/{endpoint_id}",
        f"{ENDPOINTS}/{endpoint_id}/deliveries",
        f"{ENDPOINTS}/{endpoint_id}/deliveries/{delivery_id}",
    ):
        response = await client.get(path, headers=admin(portals))
        assert response.status == 200
        assert response.headers["Cache-Control"] == "no-store"
        texts.append(await response.text())

    for text in texts:
        assert secrets["outbound_secret"] not in text
        assert secrets["inbound_secret"] not in text
        assert "whsec_" not in text
    # The public key is public: the admin can always read it again.
    assert json.loads(texts[1])["signing_public_keys"] == [secrets["signing_public_key"]]


async def test_secrets_and_the_url_token_live_only_sealed(
    client, portals: Portals, receiver: Receiver, database: Dsns
) -> None:
    token = canary("url-token")
    url = receiver.url.replace("receiver-secret", token)
    with capture_logs(processors=redacting_processors()) as logs:
        created = await register(client, portals, url)
        endpoint_id = created["endpoint"]["id"]
        rotated = await client.post(
            f"{ENDPOINTS}/{endpoint_id}/rotate", json={"purpose": "outbound"}, headers=admin(portals)
        )
        new_secret = (await rotated.json())["outbound_secret"]
        await consent(client, portals)
        await thread(client, portals)
        await receiver.wait_for(lambda got: len(got) >= 2)  # the worker opened the URL and both secrets
        shown = await admin_get(client, portals, f"{ENDPOINTS}/{endpoint_id}")

    assert shown["url"] == url  # the admin sees what they registered, token and all
    secrets = [created["secrets"]["outbound_secret"], created["secrets"]["inbound_secret"], new_secret]
    dump = await pg_dump(database)
    assert token.encode() not in dump
    for secret in secrets:
        assert not [form for form in secret_forms(secret) if form in dump]
    logged = repr(logs)
    assert token not in logged
    assert not [s for s in secrets if s in logged or s.removeprefix("whsec_") in logged]


# -- listing and changing ------------------------------------------------------------------------------


async def test_the_list_pages_with_a_cursor_newest_first(client, portals: Portals) -> None:
    made = [
        (await register(client, portals, f"{PUBLIC_URL}/{n}", subscriber=subscriber))["endpoint"]["id"]
        for n, subscriber in enumerate(
            ["Practitioner/7", "Practitioner/8", "CareTeam/cardio", "Practitioner/7", "Practitioner/9"]
        )
    ]

    pages, cursor = [], None
    while True:
        query = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        page = await (await client.get(ENDPOINTS, params=query, headers=admin(portals))).json()
        pages.append([item["id"] for item in page["items"]])
        cursor = page["next_cursor"]
        if cursor is None:
            break

    assert [len(p) for p in pages] == [2, 2, 1]
    assert [i for p in pages for i in p] == made[::-1]
    team = await admin_get(client, portals, f"{ENDPOINTS}?subscriber=CareTeam/cardio")
    assert [i["id"] for i in team["items"]] == [made[2]]
    bad = await client.get(ENDPOINTS, params={"cursor": "not-a-cursor"}, headers=admin(portals))
    assert bad.status == 422


async def test_patch_changes_the_url_and_the_events_delivered(client, portals: Portals, receiver: Receiver) -> None:
    created = await register(client, portals, PUBLIC_URL, event_types=ALL_EVENTS)
    endpoint_id = created["endpoint"]["id"]
    path = f"{ENDPOINTS}/{endpoint_id}"

    patched = await client.patch(
        path, json={"url": receiver.url, "event_types": ["message.created"]}, headers=admin(portals)
    )

    assert patched.status == 200, await patched.text()
    shown = await admin_get(client, portals, path)
    assert (shown["url"], shown["event_types"]) == (receiver.url, ["message.created"])
    assert datetime.fromisoformat(shown["updated_at"]) > datetime.fromisoformat(created["endpoint"]["updated_at"])
    await consent(client, portals)
    made = await thread(client, portals)
    await receiver.wait_for(lambda got: len(got) >= 1)
    assert [(r.json["type"], r.json["data"]["thread_id"]) for r in receiver.received] == [
        ("message.created", made["id"])
    ]
    for refused in ({"url": "https://10.1.2.3/hook"}, {"event_types": ["thread.deleted"]}, {"color": "red"}):
        response = await client.patch(path, json=refused, headers=admin(portals))
        assert response.status == 422, (refused, await response.text())
    assert (await admin_get(client, portals, path))["url"] == receiver.url


async def test_a_deleted_endpoint_is_gone_but_its_deliveries_are_kept(
    client, portals: Portals, receiver: Receiver, database: Dsns
) -> None:
    created = await register(client, portals, receiver.url)
    endpoint_id = created["endpoint"]["id"]
    await consent(client, portals)
    made = await thread(client, portals)
    await wait_for_delivery(client, portals, endpoint_id, lambda items: len(items) == 2)

    deleted = await client.delete(f"{ENDPOINTS}/{endpoint_id}", headers=admin(portals))

    assert deleted.status == 204
    for method in ("GET", "DELETE", "PATCH"):
        again = await client.request(
            method, f"{ENDPOINTS}/{endpoint_id}", json={"event_types": ["message.created"]}, headers=admin(portals)
        )
        assert again.status == 404, method
    assert (await admin_get(client, portals, ENDPOINTS))["items"] == []
    more = await client.post(f"/v1/threads/{made['id']}/messages", json={"body": "after"}, headers=patient(portals))
    assert more.status == 201
    conn = await asyncpg.connect(database.owner)
    try:
        kept = await conn.fetch(
            "SELECT event_type FROM webhook_outbox WHERE endpoint_id = $1 ORDER BY created_at", uuid.UUID(endpoint_id)
        )
    finally:
        await conn.close()
    assert sorted(r["event_type"] for r in kept) == ["message.created", "thread.created"]


async def test_rotation_answers_only_the_new_secret_and_both_sign_meanwhile(
    client, portals: Portals, receiver: Receiver
) -> None:
    created = await register(client, portals, receiver.url)
    endpoint_id = created["endpoint"]["id"]
    old = created["secrets"]["outbound_secret"]

    rotated = await client.post(
        f"{ENDPOINTS}/{endpoint_id}/rotate", json={"purpose": "outbound"}, headers=admin(portals)
    )

    assert rotated.status == 201, await rotated.text()
    answer = await rotated.json()
    assert answer["inbound_secret"] is None
    assert answer["signing_public_key"] is None
    new = answer["outbound_secret"]
    assert new.startswith("whsec_")
    assert new not in (old, created["secrets"]["inbound_secret"])
    await consent(client, portals)
    await thread(client, portals)
    await receiver.wait_for(lambda got: len(got) >= 1)
    received = receiver.received[0]
    for secret in (old, new):  # each receiver verifies with whichever secret it has
        Webhook(secret).verify(received.body, received.headers)
    bogus = await client.post(f"{ENDPOINTS}/{endpoint_id}/rotate", json={"purpose": "both"}, headers=admin(portals))
    assert bogus.status == 422


# -- who may ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["patient", "physician", "staff", "compliance"])
async def test_other_roles_find_nothing_and_are_audited(client, portals: Portals, database: Dsns, role: str) -> None:
    created = await register(client, portals, PUBLIC_URL)
    caller = portals.acme.auth(role=role, sub="Patient/1" if role == "patient" else "Practitioner/7")

    response = await client.get(f"{ENDPOINTS}/{created['endpoint']['id']}", headers=caller)
    rid = response.headers["X-Request-Id"]  # the service's own id for the request, in its audit events

    assert response.status == 404
    assert PUBLIC_URL not in await response.text()
    conn = await asyncpg.connect(database.owner)
    try:
        actions = await conn.fetch(
            "SELECT action, outcome FROM audit_outbox WHERE request_id = $1"
            " UNION ALL SELECT action, outcome FROM audit_leaves WHERE request_id = $1",
            rid,
        )
    finally:
        await conn.close()
    assert [(a["action"], a["outcome"]) for a in actions] == [("access:denied", "denied")]


async def test_another_tenants_admin_cannot_see_or_touch_the_endpoint(client, portals: Portals) -> None:
    created = await register(client, portals, PUBLIC_URL)
    path = f"{ENDPOINTS}/{created['endpoint']['id']}"
    globex = portals.globex.auth(**ADMIN)

    answers = [
        await client.get(path, headers=globex),
        await client.patch(path, json={"url": "https://93.184.215.15/stolen"}, headers=globex),
        await client.post(f"{path}/rotate", json={"purpose": "inbound"}, headers=globex),
        await client.post(f"{path}/disable", headers=globex),
        await client.delete(path, headers=globex),
    ]

    assert [a.status for a in answers] == [404] * 5
    assert (await (await client.get(ENDPOINTS, headers=globex)).json())["items"] == []
    shown = await admin_get(client, portals, path)
    assert (shown["url"], shown["status"]) == (PUBLIC_URL, "enabled")
