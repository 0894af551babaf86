"""The OpenAPI document: valid OpenAPI 3.1, complete (every registered route), honest about security, and
true to what the service actually sends."""

from __future__ import annotations

import ast
import asyncio
import json
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, get_args

import asyncpg
import pytest
from aiohttp import ClientResponse, web
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from standardwebhooks import Webhook

from schemas.attachments import AttachmentType
from service.api import headers as declarations
from service.api import health
from service.api.openapi import build_openapi
from service.api.routes import ROUTES, Route
from service.app import create_app
from service.domain.attachments import CONTENT_TYPES
from service.keys import PUBLIC_ROUTES
from service.settings import Settings
from tests.api.messaging_helpers import PORTAL, consent, held, patient, thread, trickle, upload, uploads_in_flight
from tests.conftest import Dsns, Portals
from tests.support import TestIssuer, as_owner, audit_events, database_connection_limit

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


# Headers of HTTP itself (framing, the body's media type), which OpenAPI does not list per response.
HTTP_HEADERS = frozenset({"content-type", "content-length", "date", "server", "transfer-encoding", "connection"})


def _resolve(document: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
    """`item`, or what its local `$ref` names."""
    ref = item.get("$ref")
    if ref is None:
        return item
    found: Any = document
    for part in ref.removeprefix("#/").split("/"):
        found = found[part]
    return dict(found)


def _is_json(content_type: str) -> bool:
    """One JSON document (not NDJSON, a stream of them)."""
    return content_type == "application/json" or content_type.endswith("+json")


async def _conforms(document: dict[str, Any], method: str, path: str, response: ClientResponse) -> None:
    """The response's status and media type are documented for the operation, its body fits the schema, and
    every header it carries (HTTP's own aside) is documented for that status, with a value that fits."""
    responses = document["paths"][path][method.lower()]["responses"]
    assert str(response.status) in responses, (method, path, response.status)
    documented = {
        name.lower(): _resolve(document, header)
        for name, header in responses[str(response.status)].get("headers", {}).items()
    }
    for name, value in response.headers.items():
        if name.lower() in HTTP_HEADERS:
            continue
        assert name.lower() in documented, (method, path, response.status, f"{name} is sent, not documented")
        schema = documented[name.lower()]["schema"]
        sent: Any = int(value) if schema.get("type") == "integer" and value.isdigit() else value
        errors = [e.message for e in _validator(document, schema).iter_errors(sent)]
        assert not errors, (method, path, response.status, name, errors)
    content = responses[str(response.status)].get("content", {})
    if response.status == 204:  # no content, documented as none
        assert (content, await response.read()) == ({}, b""), (method, path)
        return
    assert response.content_type in content, (method, path, response.status, response.content_type, list(content))
    if _is_json(response.content_type):
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
    impostor_body = {**key_body, "public_key_pem": impostor.public_pem.decode()}
    exchanges = [
        ("GET", "/healthz", {}, None),
        ("GET", "/readyz", {}, None),
        ("GET", "/metrics", {}, None),
        ("GET", "/openapi.json", {}, None),
        ("GET", "/v1/me", portals.acme.auth(role="proxy", sub="RelatedPerson/2", act_for="Patient/1"), None),
        ("GET", "/v1/me", {}, None),
        ("POST", "/v1/admin/issuers", admin, key_body),  # no endorsement: 403 endorsement-required
        ("POST", "/v1/admin/issuers", admin, {**key_body, "endorsement": portals.acme.endorse(new_key)}),
        ("POST", "/v1/admin/issuers", admin, {**impostor_body, "endorsement": portals.acme.endorse(impostor)}),
        ("POST", "/v1/admin/issuers", admin, {"issuer": 1}),
        ("POST", "/v1/admin/issuers", portals.acme.auth(), key_body),
        ("GET", "/v1/admin/issuers", admin, None),
        ("GET", "/v1/admin/issuers", portals.acme.auth(), None),
        ("POST", "/v1/admin/issuers/revoke", admin, {"issuer": new_key.issuer, "kid": new_key.kid}),
        ("POST", "/v1/admin/issuers/revoke", admin, {"issuer": new_key.issuer, "kid": "no-such-kid"}),
        ("POST", "/v1/admin/issuers/revoke", admin, {"issuer": new_key.issuer}),
        ("POST", "/v1/admin/issuers/revoke", portals.acme.auth(), {"issuer": new_key.issuer, "kid": new_key.kid}),
        ("GET", "/v1/admin/issuers", admin, None),  # with the revoked key and its revoked_at
        ("POST", "/v1/admin/issuers", admin, key_body),  # a revoked key: 409 key-revoked
    ]
    seen = set()
    for method, path, headers, body in exchanges:
        response = await client.request(method, path, headers=headers, json=body)
        await _conforms(document, method, path, response)
        seen.add((method, path, response.status))

    assert {("GET", "/v1/me", 401), ("POST", "/v1/admin/issuers", 201), ("POST", "/v1/admin/issuers", 409)} <= seen
    assert ("POST", "/v1/admin/issuers", 403) in seen
    assert {("POST", "/v1/admin/issuers", 422), ("GET", "/v1/admin/issuers", 404)} <= seen
    assert {status for _method, path, status in seen if path == "/v1/admin/issuers/revoke"} == {200, 404, 422}


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


# --- request headers: what a route reads, the document declares ----------------------------------------------

# Headers the application reads that OpenAPI does not declare as parameters: `Authorization` is the bearer
# security scheme (OpenAPI ignores a header parameter of that name), `Expect` is aiohttp's own (100-continue).
UNDECLARED = frozenset({"authorization", "expect"})


class _RecordedHeaders:
    """A request's headers that note which names were asked for; `*` when they were looked through."""

    def __init__(self, headers: Any, seen: set[str]) -> None:
        self._headers, self._seen = headers, seen

    def get(self, name: str, default: Any = None) -> Any:
        self._seen.add(name.lower())
        return self._headers.get(name, default)

    def getone(self, name: str, *default: Any) -> Any:
        self._seen.add(name.lower())
        return self._headers.getone(name, *default)

    def getall(self, name: str, *default: Any) -> Any:
        self._seen.add(name.lower())
        return self._headers.getall(name, *default)

    def __getitem__(self, name: str) -> str:
        self._seen.add(name.lower())
        return str(self._headers[name])

    def __contains__(self, name: object) -> bool:
        self._seen.add(str(name).lower())
        return name in self._headers

    def __iter__(self) -> Any:
        self._seen.add("*")
        return iter(self._headers)

    def __len__(self) -> int:
        self._seen.add("*")
        return len(self._headers)

    def __getattr__(self, attribute: str) -> Any:  # items(), keys(), values(), copy(): all of them
        self._seen.add("*")
        return getattr(self._headers, attribute)


@pytest.fixture
def header_reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, set[str]]:
    """Route name -> the request headers read while serving it (middleware and handler), lower-cased."""
    reads: dict[str, set[str]] = {}

    def headers(request: web.Request) -> _RecordedHeaders:
        info = request.match_info
        route = (info.route.name if info is not None else None) or "(no route)"
        return _RecordedHeaders(super(web.Request, request).headers, reads.setdefault(route, set()))

    monkeypatch.setattr(web.Request, "headers", property(headers))
    return reads


def _operations(document: dict[str, Any]) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """operationId -> (method, path, operation)."""
    return {
        operation["operationId"]: (method.upper(), path, operation)
        for path, item in document["paths"].items()
        for method, operation in item.items()
    }


def _parameters(document: dict[str, Any], operation: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    """The operation's parameters `in` `where`, by name (lower-cased for headers), refs resolved."""
    found = [_resolve(document, parameter) for parameter in operation.get("parameters", [])]
    return {(p["name"].lower() if where == "header" else p["name"]): p for p in found if p["in"] == where}


async def _integrated(client: Any) -> None:
    for _ in range(200):
        if (await (await client.get("/readyz")).json())["audit_backlog"] == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the sequencer did not integrate the audit backlog")


async def _tour(client: Any, portals: Portals, document: dict[str, Any]) -> set[str]:
    """Every operation of the document called once with what it needs to succeed, each answer checked
    against the document; the operationIds it called."""
    operations = _operations(document)
    toured: set[str] = set()
    acme = portals.acme
    me = acme.auth(role="patient", sub="Patient/1")
    doctor = acme.auth(role="physician", sub="Practitioner/7")
    outsider = acme.auth(role="physician", sub="Practitioner/99")
    admin = acme.auth(role="admin", sub="Practitioner/admin1")
    compliance = acme.auth(role="compliance", sub="Practitioner/c1")

    async def call(name: str, auth: dict[str, str], ids: dict[str, str] | None = None, **kw: Any) -> Any:
        method, template, _ = operations[name]
        headers = {**auth, **kw.pop("headers", {})}
        response = await client.request(method, template.format(**(ids or {})), headers=headers, **kw)
        await _conforms(document, method, template, response)
        assert 200 <= response.status < 300, (name, response.status, await response.text())
        toured.add(name)
        text = await response.text()
        return json.loads(text) if _is_json(response.content_type) and text else text

    for name in ("get_health", "get_readiness", "get_metrics", "get_openapi"):
        await call(name, {})
    await call("get_me", me)
    new_key = TestIssuer(tenant="acme", issuer=acme.issuer, kid="portal-key-2")
    key = {"issuer": new_key.issuer, "public_key_pem": new_key.public_pem.decode(), "kid": new_key.kid}
    await call("add_issuer_key", admin, json={**key, "endorsement": acme.endorse(new_key)})
    await call("list_issuer_keys", admin)
    await call("revoke_issuer_key", admin, json={"issuer": new_key.issuer, "kid": new_key.kid})
    await call("get_key_status", admin)
    await call("rewrap_keys", admin)
    team = {"team": "CareTeam/cardio", "members": ["Practitioner/7"]}
    await call("create_care_team", admin, json=team)
    await call("set_care_team_members", admin, {"team_id": "cardio"}, json={"members": ["Practitioner/7"]})
    await call("get_care_team", admin, {"team_id": "cardio"})

    hook = {"subscriber": "Practitioner/7", "url": "https://93.184.215.14/hook", "event_types": ["message.created"]}
    created = await call("register_webhook_endpoint", admin, json=hook)
    endpoint = {"id": created["endpoint"]["id"]}
    await call("list_webhook_endpoints", admin)
    await call("get_webhook_endpoint", admin, endpoint)
    await call("update_webhook_endpoint", admin, endpoint, json={"event_types": ["message.created"]})

    idempotent = {"Idempotency-Key": "tour-consent"}
    body = {"patient": "Patient/1", "grantee": "Practitioner/7", "scope": "messaging", "evidence": PORTAL}
    granted = await call("record_consent", me, json=body, headers=idempotent)
    await call("record_consent", me, json=body, headers=idempotent)  # the replay: Idempotent-Replayed
    await call("get_consent", me, {"id": granted["id"]})
    await call("list_patient_consents", me, {"patient_id": "1"})
    other = await call("record_consent", me, json={**body, "grantee": "Practitioner/8"})
    await call("revoke_consent", me, {"id": other["id"]}, json={"reason": "patient-request"})

    subject = {"patient": "Patient/1", "participants": ["Practitioner/7"], "subject": "Tour"}
    first = {**subject, "message": {"body": "Hi"}}
    made = await call("create_thread", me, json=first, headers={"Idempotency-Key": "tour-thread"})
    thread_id = {"id": made["id"]}
    await call("list_threads", me)
    reason = {"Break-Glass-Reason": "Unconscious in the ED, need history"}
    await call("get_thread", outsider, thread_id, headers=reason)
    sent = await call("send_message", me, thread_id, json={"body": "More"}, headers={"Idempotency-Key": "tour-message"})
    await call("list_messages", outsider, thread_id, headers=reason)
    await call("get_message", me, {"id": sent["id"]})
    await call("mark_read", doctor, thread_id, json={"up_to": 1})
    upload = {"Content-Type": "text/plain; charset=utf-8", "Bedside-File-Name": "tour.txt"}
    file = await call("upload_attachment", me, params={"thread_id": made["id"]}, data=b"notes", headers=upload)
    await call("download_attachment", me, {"id": file["id"]})
    grants = await call("list_break_glass", compliance)
    await call("review_break_glass", compliance, {"id": grants["items"][0]["id"]})
    second = await call("create_thread", me, json={**subject, "message": {"body": "Oops"}})
    await call("recall_message", me, {"id": second["message"]["id"]})
    await call("close_thread", me, {"id": second["id"]})

    deliveries = await call("list_webhook_deliveries", admin, endpoint)
    delivery = {**endpoint, "delivery_id": deliveries["items"][0]["id"]}
    await call("get_webhook_delivery", admin, delivery)
    await call("resend_webhook_delivery", admin, delivery)
    window = {"since": "2025-01-01T00:00:00Z", "until": "2100-01-01T00:00:00Z"}
    await call("recover_webhook_deliveries", admin, endpoint, json=window)
    reply = json.dumps({"thread_id": made["id"], "body": "Yes.", "sender": "Practitioner/7"})
    at = datetime.now(UTC)
    signed = {
        "webhook-id": "msg_tour",
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(created["secrets"]["inbound_secret"]).sign("msg_tour", at, reply),
        "Content-Type": "application/json",
    }
    await call("receive_webhook_reply", {}, {"endpoint_id": endpoint["id"]}, data=reply.encode(), headers=signed)
    await call("rotate_webhook_secret", admin, endpoint, json={"purpose": "inbound"})
    await call("disable_webhook_endpoint", admin, endpoint)
    await call("enable_webhook_endpoint", admin, endpoint)
    await call("delete_webhook_endpoint", admin, endpoint)

    await _integrated(client)
    await call("list_audit_events", compliance)
    checkpoint = await call("get_latest_checkpoint", compliance)
    size = str(checkpoint["size"])
    await call("get_inclusion_proof", compliance, params={"index": "0", "size": size})
    await call("get_consistency_proof", compliance, params={"from": "1", "to": size})
    await call("list_leaf_hashes", compliance, params={"start": "0", "end": size})
    await call("export_audit_events", compliance)
    await call("shred_patient_key", admin, json={"patient": "Patient/1", "confirm": "Patient/1"})
    return toured


@pytest.fixture
async def quiet_client(settings: Settings, aiohttp_client: Any) -> Any:
    """The real application without its webhook delivery worker: nothing leaves the machine."""
    return await aiohttp_client(create_app(settings.model_copy(update={"webhook_worker": False})))


async def test_every_header_a_route_reads_is_documented_for_it(
    quiet_client: Any, portals: Portals, header_reads: dict[str, set[str]]
) -> None:
    """A tour of every operation, each called as it succeeds, with the real application noting which request
    headers each route reads: a header a handler starts reading fails here until the route declares it. Every
    answer on the way is checked against the document too, the headers it sends included."""
    document = await _document(quiet_client)
    operations = _operations(document)

    toured = await _tour(quiet_client, portals, document)

    assert toured == set(operations), f"the tour misses {sorted(set(operations) - toured)}: add them to _tour"
    undocumented = {}
    for name, (_method, _path, operation) in operations.items():
        declared = set(_parameters(document, operation, "header")) | UNDECLARED
        if extra := header_reads.get(name, set()) - declared:
            undocumented[name] = sorted(extra)
    assert undocumented == {}, "headers read but not declared (`*`: all of them looked through)"


async def test_the_idempotency_key_is_declared_with_the_form_the_api_enforces(client, portals: Portals) -> None:
    document = await _document(client)
    body = {"patient": "Patient/1", "grantee": "Practitioner/7", "scope": "messaging", "evidence": PORTAL}
    keys = ["k" * 200, "a.b:c_d-e", "k" * 201, "", "with space", "ünïcode"]

    for name in ("create_thread", "send_message", "record_consent"):
        parameter = _parameters(document, _operations(document)[name][2], "header")["idempotency-key"]
        assert (parameter["required"], parameter["schema"]["type"]) == (False, "string"), name
    declared = _parameters(document, _operations(document)["record_consent"][2], "header")["idempotency-key"]
    for key in keys:
        response = await client.post("/v1/consents", json=body, headers={**patient(portals), "Idempotency-Key": key})
        fits = re.fullmatch(declared["schema"]["pattern"], key) is not None
        assert (response.status == 201) == fits, (key, response.status)
        await _conforms(document, "POST", "/v1/consents", response)

    again = await client.post("/v1/consents", json=body, headers={**patient(portals), "Idempotency-Key": keys[0]})
    assert (again.status, again.headers["Idempotent-Replayed"]) == (201, "true")
    await _conforms(document, "POST", "/v1/consents", again)


async def test_the_headers_routes_read_are_declared_where_they_are_read(client) -> None:
    document = await _document(client)
    operations = _operations(document)

    def headers(name: str) -> dict[str, bool]:
        declared = _parameters(document, operations[name][2], "header")
        return {key: value["required"] for key, value in declared.items() if key != "x-request-id"}

    idempotent = {"idempotency-key": False}
    assert {name: headers(name) for name in ("create_thread", "send_message", "record_consent")} == {
        "create_thread": idempotent,
        "send_message": idempotent,
        "record_consent": idempotent,
    }
    assert headers("get_thread") == headers("list_messages") == {"break-glass-reason": False}
    assert headers("upload_attachment") == {"bedside-file-name": True}
    assert headers("receive_webhook_reply") == {
        "webhook-id": True,
        "webhook-timestamp": True,
        "webhook-signature": True,
    }
    for name, (_method, _path, operation) in operations.items():
        declared = _parameters(document, operation, "header")
        assert declared["x-request-id"]["required"] is False, name
        assert all(parameter.get("description") for parameter in declared.values()), name


def test_no_api_module_spells_a_declared_header_name_itself() -> None:
    """Outside `service/api/headers.py`, the API's code names a header through its declaration, so the name
    the document gives is the one read and sent."""
    declared = {value.name.lower() for value in vars(declarations).values() if isinstance(value, declarations.Header)}
    spelled = sorted(
        (path.name, node.value)
        for path in Path(declarations.__file__).parent.glob("*.py")
        if path.name != "headers.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.lower() in declared
    )

    assert spelled == []


# --- response headers ------------------------------------------------------------------------------------------


async def test_an_outage_answer_and_its_retry_after_are_documented(client, portals: Portals, database: Dsns) -> None:
    document = await _document(client)
    async with database_connection_limit(database.owner, database.name, 0):
        await as_owner(
            database.owner,
            lambda conn: conn.fetchval(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = 'bedside'"
            ),
        )
        for _ in range(2):
            response = await client.get("/v1/threads", headers=patient(portals))
            assert (response.status, response.headers["Retry-After"]) == (503, "5")
            await _conforms(document, "GET", "/v1/threads", response)

    for name, (_method, _path, operation) in _operations(document).items():
        if "security" in operation:  # authentication needs the database: any of them may meet an outage
            assert "Retry-After" in operation["responses"]["503"]["headers"], name


# --- path parameters -------------------------------------------------------------------------------------------

# The path parameters the handlers read as UUIDs (`path_uuid`), and the ones they take as text (the FHIR id of
# a reference).
UUID_PATH_PARAMETERS = frozenset({"id", "delivery_id", "endpoint_id"})
TEXT_PATH_PARAMETERS = frozenset({"patient_id", "team_id"})


async def test_path_parameters_are_uuids_exactly_where_the_handlers_take_only_uuids(client) -> None:
    document = await _document(client)
    typed = {
        (name, parameter): spec["schema"]
        for name, (_method, _path, operation) in _operations(document).items()
        for parameter, spec in _parameters(document, operation, "path").items()
    }

    assert {parameter for _, parameter in typed} == UUID_PATH_PARAMETERS | TEXT_PATH_PARAMETERS
    for (name, parameter), schema in typed.items():
        expected = {"type": "string", "format": "uuid"} if parameter in UUID_PATH_PARAMETERS else {"type": "string"}
        assert schema == expected, (name, parameter)


def test_a_path_parameter_must_be_declared_to_be_documented(settings: Settings) -> None:
    undeclared = Route("GET", "/v1/things/{thing_id}", health.get_health, "get_thing", "A thing", "operations")

    with pytest.raises(ValueError, match=r"get_thing: \{thing_id\} is not declared"):
        build_openapi((*ROUTES, undeclared), version="0", settings=settings)


def _callers(portals: Portals) -> list[dict[str, str]]:
    """One caller of each kind that some route admits: a patient, a compliance officer, an admin."""
    acme = portals.acme
    return [
        acme.auth(role="patient", sub="Patient/1"),
        acme.auth(role="compliance", sub="Practitioner/c1"),
        acme.auth(role="admin", sub="Practitioner/admin1"),
    ]


async def test_a_path_parameter_typed_uuid_refuses_anything_else_as_a_malformed_id(
    quiet_client: Any, portals: Portals, database: Dsns
) -> None:
    """Each path parameter of each operation, sent as a value that is not a UUID (its others as UUIDs), by
    every kind of caller: one typed `format: uuid` is a 404 the handler audits as a malformed id (a public
    route has nobody to audit: only the 404); one typed plain `string` is never refused as one."""
    document = await _document(quiet_client)
    callers = _callers(portals)
    sent: dict[tuple[str, str], list[str]] = {}
    for name, (method, template, operation) in _operations(document).items():
        path_parameters = _parameters(document, operation, "path")
        for parameter, spec in path_parameters.items():
            values = {p: str(uuid.uuid4()) for p in path_parameters} | {parameter: "not-a-uuid"}
            for caller in callers:
                request_id = uuid.uuid4().hex
                headers = {**caller, "X-Request-Id": request_id}
                response = await quiet_client.request(method, template.format(**values), headers=headers)
                if spec["schema"].get("format") == "uuid":
                    assert response.status == 404, (name, parameter, response.status)
                    assert (await response.json(content_type=None))["code"] == "not-found", (name, parameter)
                sent.setdefault((name, parameter), []).append(request_id)

    refused = {
        details.get("client_request_id")
        for event in await audit_events(database.owner, "action = 'access:denied'")
        if (details := json.loads(event["details"])).get("reason") == "malformed-id"
    }
    public = {
        name for name, (_method, _path, operation) in _operations(document).items() if "security" not in operation
    }
    recorded = {key: bool(refused & set(ids)) for key, ids in sent.items() if key[0] not in public}
    assert recorded == {key: key[1] in UUID_PATH_PARAMETERS for key in recorded}
    assert {parameter for _, parameter in sent} == UUID_PATH_PARAMETERS | TEXT_PATH_PARAMETERS


# --- the attachment upload's body ------------------------------------------------------------------------------

LIMIT = 1024
# A file of each type Bedside stores, `LIMIT` bytes long: the content must match the declared type.
FILES = {
    "application/pdf": b"%PDF-1.7\n".ljust(LIMIT, b"%"),
    "image/png": b"\x89PNG\r\n\x1a\n".ljust(LIMIT, b"\x00"),
    "image/jpeg": b"\xff\xd8\xff\xe0".ljust(LIMIT, b"\x00"),
    "text/plain": b"notes".ljust(LIMIT, b"."),
}


async def test_the_upload_body_is_the_file_in_exactly_the_stored_types_up_to_the_size_limit(
    settings: Settings, portals: Portals, aiohttp_client: Any
) -> None:
    limited = await aiohttp_client(create_app(settings.model_copy(update={"max_attachment_bytes": LIMIT})))
    document = await _document(limited)
    operation = document["paths"]["/v1/attachments"]["post"]
    body = operation["requestBody"]
    await consent(limited, portals)
    made = await thread(limited, portals)

    assert (body["required"], body["x-max-bytes"]) == (True, LIMIT)
    assert f"more than {LIMIT} bytes" in operation["responses"]["413"]["description"]
    assert tuple(body["content"]) == CONTENT_TYPES
    assert {media: content["schema"]["maxLength"] for media, content in body["content"].items()} == dict.fromkeys(
        CONTENT_TYPES, LIMIT
    )
    assert set(FILES) == set(CONTENT_TYPES)

    async def upload(media: str, data: bytes) -> ClientResponse:
        headers = {**patient(portals), "Content-Type": media, "Bedside-File-Name": "file"}
        response = await limited.post("/v1/attachments", params={"thread_id": made["id"]}, data=data, headers=headers)
        await _conforms(document, "POST", "/v1/attachments", response)
        return response

    for media in body["content"]:
        assert (await upload(media, FILES[media])).status == 201, media
        assert (await upload(media, FILES[media] + b".")).status == 413, media
    assert (await upload("image/gif", b"GIF89a")).status == 415


async def test_an_upload_too_many_or_too_slow_is_answered_as_the_document_says(
    settings: Settings, portals: Portals, database: Dsns, aiohttp_client: Any
) -> None:
    limits = {"max_uploads_per_principal": 1, "upload_deadline_seconds": 1, "webhook_worker": False}
    limited = await aiohttp_client(create_app(settings.model_copy(update=limits)))
    document = await _document(limited)
    responses = document["paths"]["/v1/attachments"]["post"]["responses"]
    await consent(limited, portals)
    made = await thread(limited, portals)
    release = asyncio.Event()
    first = asyncio.create_task(upload(limited, patient(portals), made["id"], held(release)))
    try:
        await uploads_in_flight(database.owner, 1)
        second = await upload(limited, patient(portals), made["id"], b"%PDF-")
    finally:
        release.set()
        assert (await first).status == 201
    late = await upload(limited, patient(portals), made["id"], trickle(pieces=30, every=0.1))

    assert (second.status, late.status) == (429, 408)
    assert "Retry-After" in responses["429"]["headers"]
    await _conforms(document, "POST", "/v1/attachments", second)
    await _conforms(document, "POST", "/v1/attachments", late)


async def test_the_stored_types_are_one_list_in_the_domain_the_schema_and_the_document(client) -> None:
    """`schemas` may not import the domain, nor the domain `schemas` (pyproject's import contracts), so the
    allow-list is written twice: the domain's `CONTENT_TYPES` (what uploads are checked against) and the
    schema's `AttachmentType` (the `content_type` of an attachment). Here they are the same, in the same order,
    and so is every list of them the document shows."""
    document = await _document(client)
    operations = _operations(document)
    stored = document["components"]["schemas"]["AttachmentOut"]["properties"]["content_type"]

    assert get_args(AttachmentType) == CONTENT_TYPES
    assert tuple(stored["enum"]) == CONTENT_TYPES
    assert tuple(operations["upload_attachment"][2]["requestBody"]["content"]) == CONTENT_TYPES
    assert tuple(operations["download_attachment"][2]["responses"]["200"]["content"]) == CONTENT_TYPES


# --- JSON request bodies ---------------------------------------------------------------------------------------

JSON_LIMIT, REPLY_LIMIT = 1024, 2048


def _json_of(size: int) -> bytes:
    """A JSON document of exactly `size` bytes (of no route's schema)."""
    return b'{"pad":"' + b"x" * (size - 10) + b'"}'


async def test_every_json_body_states_the_size_limit_the_api_enforces(
    settings: Settings, portals: Portals, aiohttp_client: Any
) -> None:
    """Each JSON body's documented limit, from the settings (a signed reply has its own): a body of that many
    bytes is taken (refused for what it says, not its size), one byte more is the documented 413. Gated
    routes: whichever caller gets past the gate, which checks before the body is read."""
    limits = {"max_json_body_bytes": JSON_LIMIT, "inbound_max_body_bytes": REPLY_LIMIT, "webhook_worker": False}
    limited = await aiohttp_client(create_app(settings.model_copy(update=limits)))
    document = await _document(limited)
    callers = _callers(portals)
    stated: dict[str, int] = {}

    for name, (method, template, operation) in _operations(document).items():
        body = operation.get("requestBody", {})
        if "application/json" not in body.get("content", {}):
            continue
        limit = stated[name] = body["x-max-bytes"]
        assert f"at most {limit} bytes" in body["description"], name
        assert f"more than {limit} bytes" in operation["responses"]["413"]["description"], name
        path = template.format(**{p: str(uuid.uuid4()) for p in _parameters(document, operation, "path")})
        for caller in callers:
            headers = {**caller, "Content-Type": "application/json"}
            too_large = await limited.request(method, path, data=_json_of(limit + 1), headers=headers)
            if too_large.status != 404:
                break
        assert too_large.status == 413, (name, too_large.status)
        await _conforms(document, method, template, too_large)
        at_limit = await limited.request(method, path, data=_json_of(limit), headers=headers)
        assert at_limit.status != 413, name
        await _conforms(document, method, template, at_limit)

    assert stated == {name: REPLY_LIMIT if name == "receive_webhook_reply" else JSON_LIMIT for name in stated}
    assert {"record_consent", "send_message", "receive_webhook_reply"} <= set(stated)


# --- query parameters ------------------------------------------------------------------------------------------

# What pydantic calls a value outside a declared bound or not of the declared type: the schema's own refusals
# (the domain's further checks, such as `index < size`, have types of their own).
SCHEMA_REFUSALS = frozenset({"greater_than_equal", "less_than_equal", "int_parsing", "bool_parsing"})


def _refusals(problem: dict[str, Any], name: str) -> set[str]:
    return {error["type"] for error in problem.get("errors", []) if error["loc"] == [name]} & SCHEMA_REFUSALS


def _valid(parameter: dict[str, Any]) -> str:
    schema = parameter["schema"]
    if schema.get("format") == "uuid":
        return str(uuid.uuid4())
    return str(schema.get("minimum", 1)) if schema.get("type") == "integer" else "x"


async def test_query_parameters_are_typed_with_the_bounds_the_api_enforces(client, portals: Portals) -> None:
    """Each integer parameter at its documented minimum and maximum passes the schema and one beyond fails
    it; each boolean takes `true` and refuses anything else. Gated routes: whichever caller gets past the
    gate, which checks before the query is read."""
    document = await _document(client)
    callers = [
        portals.acme.auth(role="patient", sub="Patient/1"),
        portals.acme.auth(role="compliance", sub="Practitioner/c1"),
        portals.acme.auth(role="admin", sub="Practitioner/admin1"),
    ]
    checked: dict[tuple[str, str], dict[str, Any]] = {}

    for name, (method, template, operation) in _operations(document).items():
        query = _parameters(document, operation, "query")
        path = template.format(**{p: str(uuid.uuid4()) for p in _parameters(document, operation, "path")})
        for parameter, spec in query.items():
            schema = spec["schema"]
            if schema.get("type") == "integer":
                cases = [(str(schema[k]), str(schema[k] + step)) for k, step in (("minimum", -1), ("maximum", 1))]
            elif schema.get("type") == "boolean":
                cases = [("true", "maybe")]
            else:
                continue
            required = {p: _valid(s) for p, s in query.items() if s["required"] and p != parameter}
            for bound, beyond in cases:
                for caller in callers:
                    refused = await client.request(method, path, params={**required, parameter: beyond}, headers=caller)
                    if refused.status == 422:
                        break
                assert _refusals(await refused.json(content_type=None), parameter), (name, parameter, beyond)
                taken = await client.request(method, path, params={**required, parameter: bound}, headers=caller)
                problem = await taken.json(content_type=None) if taken.status == 422 else {}
                assert not _refusals(problem, parameter), (name, parameter, bound, problem)
            checked[name, parameter] = schema

    assert {key: checked.get(key, {}).get("type") for key in LIST_PARAMETERS} == LIST_PARAMETERS


LIST_PARAMETERS = {
    ("list_threads", "limit"): "integer",
    ("list_threads", "unread"): "boolean",
    ("list_messages", "after"): "integer",
    ("list_messages", "before"): "integer",
    ("list_messages", "limit"): "integer",
}
