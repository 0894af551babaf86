"""The SSRF guard wired in: registration and updates refuse every forbidden address class (IP literals and
names resolving to them), and the worker checks again before every send, so a name that starts resolving
inside after registration is refused at send time and nothing is connected to.

DNS is the outside world here: `service.app.system_resolver` is replaced by a table the test controls
(names it does not know still go to the real resolver). The classifier itself is tested in
tests/unit/test_ssrf.py."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

import pytest
from aiohttp import web

from service.app import create_app
from service.domain.ssrf import IPAddress
from service.settings import Settings
from service.workers.http import system_resolver
from tests.api.messaging_helpers import consent, patient, thread
from tests.api.webhook_helpers import ADMIN, Receiver, admin_get, register, wait_for_delivery
from tests.conftest import Portals

NO_LOOPBACK = {"webhook_allow_http_loopback": False}

# (an https URL with an IP literal host, the reason the guard gives)
FORBIDDEN_LITERALS: list[tuple[str, str]] = [
    ("https://10.0.0.1/hook", "private"),
    ("https://10.255.255.254/hook", "private"),
    ("https://172.16.0.1/hook", "private"),
    ("https://172.31.255.254/hook", "private"),
    ("https://192.168.1.1/hook", "private"),
    ("https://127.0.0.1/hook", "loopback"),
    ("https://127.8.9.10:8443/hook", "loopback"),
    ("https://[::1]/hook", "loopback"),
    ("https://169.254.169.254/latest/meta-data/", "metadata"),
    ("https://169.254.1.1/hook", "link-local"),
    ("https://100.64.0.1/hook", "cgnat"),
    ("https://100.127.255.254/hook", "cgnat"),
    ("https://224.0.0.1/hook", "multicast"),
    ("https://240.0.0.1/hook", "reserved"),
    ("https://255.255.255.255/hook", "broadcast"),
    ("https://[::ffff:10.0.0.1]/hook", "private"),
    ("https://[::ffff:169.254.169.254]/hook", "metadata"),
    ("https://[64:ff9b::a00:1]/hook", "private"),
    ("https://[64:ff9b::7f00:1]/hook", "loopback"),
    ("https://[2002:0a00:0001::]/hook", "private"),
    ("https://[2002:a9fe:a9fe::]/hook", "metadata"),
    ("https://[fe80::1]/hook", "link-local"),
    ("https://[fc00::1]/hook", "unique-local"),
    ("https://[fd12:3456::1]/hook", "unique-local"),
    ("https://[ff02::1]/hook", "multicast"),
    ("https://0.0.0.0/hook", "unspecified"),
    ("https://[::]/hook", "unspecified"),
]

# Names the test's DNS answers for, and why each is refused.
FORBIDDEN_NAMES: dict[str, tuple[list[str], str]] = {
    "intranet.partner.test": (["10.1.2.3"], "private"),
    "metadata.partner.test": (["169.254.169.254"], "metadata"),
    "split.partner.test": (["93.184.216.34", "192.168.0.10"], "private"),  # one public, one not: refused
    "v6.partner.test": (["93.184.216.34", "fd00::1"], "unique-local"),
}


class Dns:
    """A resolver whose answers the test sets; names it does not know go to the system resolver."""

    def __init__(self) -> None:
        self.table: dict[str, list[IPAddress]] = {}
        self.asked: list[str] = []

    def answer(self, host: str, *addresses: str) -> None:
        self.table[host] = [ipaddress.ip_address(a) for a in addresses]

    async def resolve(self, host: str, port: int) -> Sequence[IPAddress]:
        self.asked.append(host)
        if host in self.table:
            return self.table[host]
        return await system_resolver(host, port)


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> Dns:
    fake = Dns()
    for host, (addresses, _) in FORBIDDEN_NAMES.items():
        fake.answer(host, *addresses)
    monkeypatch.setattr("service.app.system_resolver", fake.resolve)
    return fake


@pytest.fixture
def settings(settings: Settings, request: pytest.FixtureRequest) -> Settings:
    """The webhook test settings, with a test's own overrides (`parametrize("settings", [...], indirect=True)`)."""
    return settings.model_copy(update=getattr(request, "param", {}))


@pytest.fixture
async def app(settings: Settings, dns: Dns) -> web.Application:
    """The real application, resolving names through the test's DNS."""
    return create_app(settings)


async def try_register(client: Any, portals: Portals, url: str) -> tuple[int, dict[str, Any]]:
    body = {"subscriber": "Practitioner/7", "url": url, "event_types": ["message.created"]}
    response = await client.post("/v1/admin/webhook-endpoints", json=body, headers=portals.acme.auth(**ADMIN))
    return response.status, await response.json()


def refusal(status: int, problem: dict[str, Any]) -> str | None:
    """The guard's reason if this is its 422 unsafe-url answer on the url field, else None."""
    if status != 422 or problem.get("code") != "unsafe-url":
        return None
    [error] = problem["errors"]
    assert error["loc"] == ["url"]
    kind: str = error["type"]
    return kind.removeprefix("unsafe-url:")


@pytest.mark.parametrize("settings", [NO_LOOPBACK], indirect=True)
async def test_registration_refuses_every_forbidden_address_class(client, portals: Portals) -> None:
    """Each IP-literal https URL of a forbidden class is refused with 422 unsafe-url and its reason, and
    no endpoint is created; a globally routable literal is accepted (the control)."""
    wrong = []
    for url, reason in FORBIDDEN_LITERALS:
        status, problem = await try_register(client, portals, url)
        if refusal(status, problem) != reason:
            wrong.append((url, status, problem.get("code"), problem.get("errors")))
    assert wrong == []
    assert (await admin_get(client, portals, "/v1/admin/webhook-endpoints"))["items"] == []

    status, _ = await try_register(client, portals, "https://93.184.216.34/hook")
    assert status == 201


@pytest.mark.parametrize("settings", [NO_LOOPBACK], indirect=True)
async def test_registration_refuses_names_that_resolve_to_a_forbidden_address(
    client, portals: Portals, dns: Dns
) -> None:
    """A name is judged by every address it resolves to: one private address among public ones is enough.
    `https://localhost/` (the real resolver) is loopback, refused when loopback is not allowed."""
    wrong = []
    for host, (_, reason) in FORBIDDEN_NAMES.items():
        status, problem = await try_register(client, portals, f"https://{host}/hook")
        if refusal(status, problem) != reason:
            wrong.append((host, status, problem))
    status, problem = await try_register(client, portals, "https://localhost/hook")
    if refusal(status, problem) != "loopback":
        wrong.append(("localhost", status, problem))
    assert wrong == []
    assert set(dns.asked) == {*FORBIDDEN_NAMES, "localhost"}
    assert (await admin_get(client, portals, "/v1/admin/webhook-endpoints"))["items"] == []


async def test_http_goes_only_to_loopback_even_when_development_allows_it(client, portals: Portals, dns: Dns) -> None:
    """The development switch lets http reach loopback only: http to a public or a private address is
    still refused."""
    dns.answer("public.partner.test", "93.184.216.34")
    assert refusal(*await try_register(client, portals, "http://public.partner.test/hook")) == "scheme"
    assert refusal(*await try_register(client, portals, "http://10.0.0.1/hook")) == "private"
    assert refusal(*await try_register(client, portals, "http://169.254.169.254/")) == "metadata"


async def test_changing_the_url_to_a_forbidden_address_is_refused(client, portals: Portals, receiver: Receiver) -> None:
    """PATCH checks the new URL like registration does: refused, and the endpoint keeps its old URL."""
    created = await register(client, portals, receiver.url)
    endpoint_id = created["endpoint"]["id"]

    response = await client.patch(
        f"/v1/admin/webhook-endpoints/{endpoint_id}",
        json={"url": "https://[::ffff:169.254.169.254]/"},
        headers=portals.acme.auth(**ADMIN),
    )

    assert refusal(response.status, await response.json()) == "metadata"
    assert (await admin_get(client, portals, f"/v1/admin/webhook-endpoints/{endpoint_id}"))["url"] == receiver.url


async def test_a_name_that_starts_resolving_inside_is_refused_at_send_time(
    client, portals: Portals, receiver: Receiver, dns: Dns
) -> None:
    """An endpoint registered while its name resolved to an acceptable address (the loopback receiver, as
    development allows) delivers; when the name later resolves to a private address, the next delivery
    is refused before any connection (error class unsafe-url), retried on schedule and dead-lettered."""
    dns.answer("hooks.partner.test", "127.0.0.1")
    url = f"http://hooks.partner.test:{receiver.port}/hooks/bedside?token=receiver-secret"
    created = await register(client, portals, url, event_types=["message.created"])
    endpoint_id = created["endpoint"]["id"]
    await consent(client, portals)
    made = await thread(client, portals)
    await receiver.wait_for(lambda got: len(got) == 1)
    assert receiver.received[0].headers["host"] == f"hooks.partner.test:{receiver.port}"

    dns.answer("hooks.partner.test", "10.0.0.7")
    sent = await client.post(f"/v1/threads/{made['id']}/messages", json={"body": "two"}, headers=patient(portals))
    assert sent.status == 201
    items = await wait_for_delivery(
        client, portals, endpoint_id, lambda items: len(items) == 2 and items[0]["status"] == "dead"
    )

    view = await admin_get(client, portals, f"/v1/admin/webhook-endpoints/{endpoint_id}/deliveries/{items[0]['id']}")
    assert [(a["status_code"], a["error_class"]) for a in view["attempt_log"]] == [(None, "unsafe-url")] * 4
    assert len(receiver.received) == 1
    assert dns.asked.count("hooks.partner.test") >= 6  # registration, the first send, and every attempt after


@pytest.mark.parametrize("settings", [NO_LOOPBACK], indirect=True)
async def test_a_deployment_that_stops_allowing_loopback_stops_sending_there(
    settings: Settings, client, portals: Portals, receiver: Receiver, aiohttp_client: Any, dns: Dns
) -> None:
    """An endpoint registered on a development deployment (http to loopback allowed) is refused at send
    time by one that does not allow it: the guard runs again on every attempt, not only at registration."""
    development = await aiohttp_client(
        create_app(settings.model_copy(update={"webhook_allow_http_loopback": True, "webhook_worker": False}))
    )
    created = await register(development, portals, receiver.url, event_types=["message.created"])
    endpoint_id = created["endpoint"]["id"]
    await consent(client, portals)
    await thread(client, portals)

    [dead] = await wait_for_delivery(
        client, portals, endpoint_id, lambda items: len(items) == 1 and items[0]["status"] == "dead"
    )
    view = await admin_get(client, portals, f"/v1/admin/webhook-endpoints/{endpoint_id}/deliveries/{dead['id']}")
    assert {a["error_class"] for a in view["attempt_log"]} == {"unsafe-url"}
    assert receiver.received == []
