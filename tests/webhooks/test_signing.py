"""Signatures a receiver can check with any Standard Webhooks library, through secret rotation, and the
optional Ed25519 (`v1a`) signature under the endpoint's public key."""

from __future__ import annotations

import time
from typing import Any

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from crypto.webhooks import WebhookVerificationError as BadSignature
from crypto.webhooks import generate_secret, verify
from tests.api.messaging_helpers import consent, patient, thread
from tests.api.webhook_helpers import ADMIN, Received, Receiver, admin_get, register
from tests.conftest import Portals


def entries(received: Received, version: str) -> list[str]:
    """The signature entries of one version (`v1`, `v1a`) in a request's `webhook-signature` header."""
    return [e for e in received.headers["webhook-signature"].split(" ") if e.split(",", 1)[0] == version]


async def rotate(client: Any, portals: Portals, endpoint_id: str, purpose: str) -> dict[str, Any]:
    response = await client.post(
        f"/v1/admin/webhook-endpoints/{endpoint_id}/rotate",
        json={"purpose": purpose},
        headers=portals.acme.auth(**ADMIN),
    )
    assert response.status == 201, await response.text()
    secrets: dict[str, Any] = await response.json()
    return secrets


async def send(client: Any, portals: Portals, thread_id: str, body: str) -> None:
    response = await client.post(f"/v1/threads/{thread_id}/messages", json={"body": body}, headers=patient(portals))
    assert response.status == 201, await response.text()


async def test_during_an_outbound_rotation_both_the_old_and_the_new_secret_verify(
    client, portals: Portals, receiver: Receiver
) -> None:
    """Before rotation one v1 signature; after it two, and a receiver holding either secret accepts the
    delivery with the standardwebhooks package; a secret that is neither is refused."""
    created = await register(client, portals, receiver.url, event_types=["message.created"])
    endpoint_id, old = created["endpoint"]["id"], created["secrets"]["outbound_secret"]
    await consent(client, portals)
    made = await thread(client, portals, message="before rotation")
    await receiver.wait_for(lambda got: len(got) == 1)
    before = receiver.received[0]
    assert len(entries(before, "v1")) == 1
    Webhook(old).verify(before.body, before.headers)

    rotated = await rotate(client, portals, endpoint_id, "outbound")
    new = rotated["outbound_secret"]
    assert new.startswith("whsec_")
    assert new != old
    assert rotated["inbound_secret"] is None
    await send(client, portals, made["id"], "after rotation")
    await receiver.wait_for(lambda got: len(got) == 2)

    after = receiver.received[1]
    assert len(entries(after, "v1")) == 2
    assert Webhook(old).verify(after.body, after.headers)["type"] == "message.created"
    assert Webhook(new).verify(after.body, after.headers)["type"] == "message.created"
    with pytest.raises(WebhookVerificationError):
        Webhook(generate_secret()).verify(after.body, after.headers)
    with pytest.raises(WebhookVerificationError):  # the new secret did not sign what went before
        Webhook(new).verify(before.body, before.headers)
    tampered = after.body.replace(b"message.created", b"message.recalled")
    with pytest.raises(WebhookVerificationError):
        Webhook(new).verify(tampered, after.headers)


async def test_rotating_the_inbound_secret_leaves_outbound_signatures_alone(
    client, portals: Portals, receiver: Receiver
) -> None:
    """Rotating the reply (inbound) secret changes nothing for the receiver: still one v1 signature under
    the outbound secret it has."""
    created = await register(client, portals, receiver.url, event_types=["thread.created"])
    rotated = await rotate(client, portals, created["endpoint"]["id"], "inbound")
    assert rotated["inbound_secret"].startswith("whsec_")
    assert rotated["outbound_secret"] is None
    await consent(client, portals)
    await thread(client, portals)
    await receiver.wait_for(lambda got: len(got) == 1)

    assert len(entries(receiver.received[0], "v1")) == 1
    Webhook(created["secrets"]["outbound_secret"]).verify(receiver.received[0].body, receiver.received[0].headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(rotated["inbound_secret"]).verify(receiver.received[0].body, receiver.received[0].headers)


async def test_ed25519_signatures_verify_under_the_public_key_returned_at_registration(
    client, portals: Portals, receiver: Receiver
) -> None:
    """With ed25519=true each delivery also carries a v1a signature that verifies under the whpk_ key shown
    at registration (and listed on the endpoint); HMAC-only receivers still verify the v1 entry."""
    created = await register(client, portals, receiver.url, event_types=["message.created"], ed25519=True)
    endpoint_id, public = created["endpoint"]["id"], created["secrets"]["signing_public_key"]
    assert public.startswith("whpk_")
    assert created["endpoint"]["signing_public_keys"] == [public]
    await consent(client, portals)
    made = await thread(client, portals, message="signed twice")
    await receiver.wait_for(lambda got: len(got) == 1)
    first = receiver.received[0]

    assert len(entries(first, "v1a")) == 1
    assert len(entries(first, "v1")) == 1
    assert verify(first.headers, first.body, [], now=int(time.time()), public_keys=[public]) == 0
    Webhook(created["secrets"]["outbound_secret"]).verify(first.body, first.headers)

    rotated = await rotate(client, portals, endpoint_id, "ed25519")
    new_public = rotated["signing_public_key"]
    assert new_public.startswith("whpk_")
    assert new_public != public
    endpoint = await admin_get(client, portals, f"/v1/admin/webhook-endpoints/{endpoint_id}")
    assert sorted(endpoint["signing_public_keys"]) == sorted([public, new_public])
    await send(client, portals, made["id"], "signed during a key rotation")
    await receiver.wait_for(lambda got: len(got) == 2)
    second = receiver.received[1]

    assert len(entries(second, "v1a")) == 2
    for key in (public, new_public):
        verify(second.headers, second.body, [], now=int(time.time()), public_keys=[key])
    tampered = second.body.replace(b"message.created", b"message.recalled")
    with pytest.raises(BadSignature):
        verify(second.headers, tampered, [], now=int(time.time()), public_keys=[new_public])
