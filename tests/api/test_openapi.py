"""The OpenAPI document: valid OpenAPI 3.1, complete (every registered route), honest about security, and
true to what the service actually sends."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from aiohttp import ClientResponse, web
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from standardwebhooks import Webhook

from service.keys import PUBLIC_ROUTES
from tests.api.messaging_helpers import consent, thread
from tests.conftest import Dsns, Portals
from tests.support import TestIssuer

DOCUMENT_URI = "urn:bedside:openapi"


async def _document(client) -> dict[str, Any]:
    response = await client.get("/openapi.json")
    assert response.status == 200
    assert response.content_type == "application/json"
    return await response.json()


def _registered(app: web.Application) -> list[tuple[str, str, str | None]]:
    """(method, path template, route name) of every route the application serves, HEAD aside."""
    return [
        (route.method, route.resource.canonical, route.name)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    ]


async def test_document_is_valid_openapi_3_1(client) -> None:
    document = await _document(client)
    assert document["openapi"].startswith("3.1")
    validate(document)


async def test_every_registered_route_is_documented_with_its_method(client, app: web.Application) -> None:
    document = await _document(client)
    registered = _registered(app)

    assert registered
    for method, path, _name in registered:
        assert method.lower() in document["paths"].get(path, {}), (method, path)
    documented = {(method.upper(), path) for path, item in document["paths"].items() for method in item}
    assert documented == {(method, path) for method, path, _name in registered}


async def test_every_non_public_operation_declares_bearer_security_and_401(client, app: web.Application) -> None:
    document = await _document(client)
    public = app[PUBLIC_ROUTES]
    assert document["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
    }

    for method, path, name in _registered(app):
        operation = document["paths"][path][method.lower()]
        assert operation["operationId"] == name
        if name in public:
            assert "security" not in operation, name
        else:
            assert operation["security"] == [{"bearer": []}], name
            assert "401" in operation["responses"], name


async def test_public_routes_are_only_the_operational_ones_and_signed_replies(app: web.Application) -> None:
    # receive_webhook_reply takes no bearer token: the endpoint's webhook signature is its credential.
    operational = {"get_health", "get_readiness", "get_metrics", "get_openapi"}
    assert app[PUBLIC_ROUTES] == operational | {"receive_webhook_reply"}


async def test_the_signed_reply_operation_documents_its_refusals(client) -> None:
    operation = (await _document(client))["paths"]["/v1/inbound/{endpoint_id}/replies"]["post"]
    assert "security" not in operation
    assert {"200", "201", "400", "401", "409", "413", "422"} <= set(operation["responses"])


# --- the document describes what is actually sent -------------------------------------------------------------


def _validator(document: dict[str, Any], schema: dict[str, Any]) -> Draft202012Validator:
    registry: Registry[Any] = Registry().with_resource(
        DOCUMENT_URI, Resource.from_contents(document, default_specification=DRAFT202012)
    )
    ref = schema.get("$ref", "")
    if ref.startswith("#/"):
        schema = {"$ref": DOCUMENT_URI + ref}
    return Draft202012Validator(schema, registry=registry)


async def _conforms(document: dict[str, Any], method: str, path: str, response: ClientResponse) -> None:
    """The response's status and media type are documented for the operation, and its body fits the schema."""
    responses = document["paths"][path][method.lower()]["responses"]
    assert str(response.status) in responses, (method, path, response.status)
    content = responses[str(response.status)].get("content", {})
    if response.status == 204:  # no content, documented as none
        assert (content, await response.read()) == ({}, b""), (method, path)
        return
    assert response.content_type in content, (method, path, response.status, response.content_type, list(content))
    if response.content_type.endswith("json"):
        body = json.loads(await response.text())
        errors = [
            error.message for error in _validator(document, content[response.content_type]["schema"]).iter_errors(body)
        ]
        assert not errors, (method, path, response.status, errors)


async def test_responses_match_what_the_document_says(client, portals: Portals) -> None:
    document = await _document(client)
    admin = portals.acme.auth(role="admin", sub="Practitioner/admin1")
    new_key = TestIssuer(tenant="acme", issuer=portals.acme.issuer, kid="portal-key-2")
    key_body = {"issuer": new_key.issuer, "public_key_pem": new_key.public_pem.decode(), "kid": new_key.kid}
    impostor = TestIssuer(tenant="acme", issuer=portals.acme.issuer, kid="portal-key-2")
    exchanges = [
        ("GET", "/healthz", {}, None),
        ("GET", "/readyz", {}, None),
        ("GET", "/metrics", {}, None),
        ("GET", "/openapi.json", {}, None),
        ("GET", "/v1/me", portals.acme.auth(role="proxy", sub="RelatedPerson/2", act_for="Patient/1"), None),
        ("GET", "/v1/me", {}, None),
        ("POST", "/v1/admin/issuers", admin, key_body),
        ("POST", "/v1/admin/issuers", admin, {**key_body, "public_key_pem": impostor.public_pem.decode()}),
        ("POST", "/v1/admin/issuers", admin, {"issuer": 1}),
        ("POST", "/v1/admin/issuers", portals.acme.auth(), key_body),
        ("GET", "/v1/admin/issuers", admin, None),
        ("GET", "/v1/admin/issuers", portals.acme.auth(), None),
    ]
    seen = set()
    for method, path, headers, body in exchanges:
        response = await client.request(method, path, headers=headers, json=body)
        await _conforms(document, method, path, response)
        seen.add((method, path, response.status))

    assert {("GET", "/v1/me", 401), ("POST", "/v1/admin/issuers", 201), ("POST", "/v1/admin/issuers", 409)} <= seen
    assert {("POST", "/v1/admin/issuers", 422), ("GET", "/v1/admin/issuers", 404)} <= seen


async def test_webhook_responses_match_what_the_document_says(client, portals: Portals) -> None:
    document = await _document(client)
    admin = portals.acme.auth(role="admin", sub="Practitioner/admin1")
    endpoints = "/v1/admin/webhook-endpoints"
    body = {"subscriber": "Practitioner/7", "url": "https://93.184.215.14/hook", "event_types": ["message.created"]}
    registered = await client.post(endpoints, json=body, headers=admin)
    await _conforms(document, "POST", endpoints, registered)
    created = await registered.json()
    endpoint = f"{endpoints}/{created['endpoint']['id']}"
    await consent(client, portals)
    made = await thread(client, portals)

    reply = json.dumps({"thread_id": made["id"], "body": "Yes.", "sender": "Practitioner/7"})
    other = reply.replace("Yes", "No")
    at = datetime.now(UTC)

    def signed(text: str) -> dict[str, str]:
        return {
            "webhook-id": "msg_openapi",
            "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": Webhook(created["secrets"]["inbound_secret"]).sign("msg_openapi", at, text),
            "Content-Type": "application/json",
        }

    inbound = f"/v1/inbound/{created['endpoint']['id']}/replies"
    exchanges: list[tuple[str, str, str, dict[str, str], Any]] = [
        ("POST", endpoints, endpoints, admin, {**body, "url": "https://10.0.0.1/hook"}),
        ("GET", endpoints, endpoints, admin, None),
        ("GET", "/v1/admin/webhook-endpoints/{id}", endpoint, admin, None),
        ("PATCH", "/v1/admin/webhook-endpoints/{id}", endpoint, admin, {"event_types": ["thread.created"]}),
        ("POST", "/v1/admin/webhook-endpoints/{id}/rotate", f"{endpoint}/rotate", admin, {"purpose": "inbound"}),
        ("POST", "/v1/admin/webhook-endpoints/{id}/disable", f"{endpoint}/disable", admin, None),
        ("POST", "/v1/admin/webhook-endpoints/{id}/enable", f"{endpoint}/enable", admin, None),
        ("GET", "/v1/admin/webhook-endpoints/{id}/deliveries", f"{endpoint}/deliveries", admin, None),
        ("POST", "/v1/inbound/{endpoint_id}/replies", inbound, signed(reply), reply.encode()),
        ("POST", "/v1/inbound/{endpoint_id}/replies", inbound, signed(reply), reply.encode()),
        ("POST", "/v1/inbound/{endpoint_id}/replies", inbound, signed(other), other.encode()),
        ("POST", "/v1/inbound/{endpoint_id}/replies", inbound, {**signed(reply), "webhook-id": "msg.x"}, b"{}"),
        (
            "POST",
            "/v1/inbound/{endpoint_id}/replies",
            inbound,
            {**signed(reply), "webhook-signature": "v1,AA=="},
            b"{}",
        ),
        ("DELETE", "/v1/admin/webhook-endpoints/{id}", endpoint, admin, None),
    ]
    seen = set()
    for method, template, path, headers, payload in exchanges:
        if isinstance(payload, bytes):
            response = await client.request(method, path, headers=headers, data=payload)
        else:
            response = await client.request(method, path, headers=headers, json=payload)
        await _conforms(document, method, template, response)
        seen.add((method, template, response.status))

    replies = {status for method, template, status in seen if template.startswith("/v1/inbound")}
    assert replies == {201, 200, 409, 400, 401}
    assert ("POST", endpoints, 422) in seen


@pytest.mark.parametrize(
    ("data", "content_type"),
    [(b"{", "application/json"), (b"{}", "text/plain")],
    ids=["malformed", "unsupported-media-type"],
)
async def test_body_errors_match_what_the_document_says(client, portals: Portals, data, content_type) -> None:
    document = await _document(client)
    headers = {**portals.acme.auth(role="admin", sub="Practitioner/admin1"), "Content-Type": content_type}
    response = await client.post("/v1/admin/issuers", data=data, headers=headers)
    await _conforms(document, "POST", "/v1/admin/issuers", response)


async def test_not_ready_response_matches_what_the_document_says(client, database: Dsns) -> None:
    document = await _document(client)
    conn = await asyncpg.connect(database.owner)
    try:
        await conn.execute("INSERT INTO schema_migrations (version, name, checksum) VALUES (9999, 'future', 'x')")
    finally:
        await conn.close()

    response = await client.get("/readyz")

    assert response.status == 503
    await _conforms(document, "GET", "/readyz", response)
