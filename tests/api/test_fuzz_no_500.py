"""No request is a server error: every route of the route table, fuzzed with hypothesis against the real
service, answers bad input with a 4xx RFC 9457 problem, writes nothing when it refuses, and never puts
what the client sent (the canary planted in every piece of text) into an error body.

The routes come from `service.api.routes.ROUTES`, so a new route cannot be forgotten: it needs an entry in
`FUZZ` (who calls it and which real ids its path names; its body schema and query parameters come from the
table itself) or in `EXEMPT` with the reason. The attachment upload, whose body is the file itself,
streamed, is exempt and gets hand-made cases instead (`test_uploads_...`).

One database and one running service serve the whole module (a database and an app per route would cost
more than the fuzzing); each route gets a world of its own in it, built through the API as a portal would:
a patient with consents, a thread with a message and an attachment, a care team, a webhook endpoint with
deliveries, a break-glass grant. What one route's requests change (a shredded patient, a closed thread, a
deleted endpoint) stays in that route's world. Around every request the test fingerprints every table but
the audit log's, as the database owner: a refusal that changed any of them is a partial write.

`WERE_SERVER_ERRORS` keeps, as plain cases, the requests the fuzzing found answered with a 500 (or with a
stream that broke off), each fixed in the commit that added it.

Examples per route: 30 by default, so that the module stays a small part of the suite; a deeper run is
`BEDSIDE_FUZZ_EXAMPLES=500 .venv/bin/python -m pytest tests/api/test_fuzz_no_500.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import aiohttp
import asyncpg
import jwt
import pytest
import pytest_asyncio
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from multidict import CIMultiDict
from structlog.testing import capture_logs
from yarl import URL

from service.api.routes import ROUTES
from service.api.server import app_runner
from service.app import create_app
from service.domain.audit import AuditRecorder
from service.domain.issuers import IssuerService
from service.domain.principal import Role
from service.domain.tenants import TenantService
from service.store.audit import AuditStore
from service.store.db import Database
from service.store.issuers import IssuerStore
from service.store.tenants import TenantStore
from tests.api.fuzz_helpers import (
    CANARY,
    WEBHOOK_URL,
    Fuzz,
    Request,
    World,
    query_params,
    requests,
    unsupported_fields,
)
from tests.conftest import TEMPLATE, Cluster, create_database, drop_database, service_settings
from tests.support import TestIssuer

# The async tests share the module's loop, on which `served` runs the service.
on_the_module_loop = pytest.mark.asyncio(loop_scope="module")

EXAMPLES = int(os.environ.get("BEDSIDE_FUZZ_EXAMPLES", "30"))
BODY_LIMIT = 256 * 1024  # the JSON body limit here: a 413 needs only a modest body
CARE = ("patient", "proxy", "physician", "staff")
CALLERS = (*CARE, "outsider", "compliance", "admin")
BREAK_GLASS_REASON = "Unconscious in the ED, need history"


def _idempotency_keys(world: World) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(("key-1", "key-2", "a" * 200, "a" * 201, "key 1", "key/1")),
        st.uuids().map(str),
        st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40),
    )


def _break_glass_reasons(world: World) -> st.SearchStrategy[str]:
    return st.sampled_from((BREAK_GLASS_REASON, "too short", "x" * 500, "x" * 501, BREAK_GLASS_REASON + CANARY))


def _sub(world: World, who: str) -> str:
    return world.identities[who]["sub"]


# Bodies each route accepts in a world, where plausible fields alone would rarely make one.
def _consents(world: World) -> list[dict[str, Any]]:
    patient, portal = _sub(world, "patient"), {"method": "portal", "text_version": "consent-text-v3"}
    until = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    return [
        {"patient": patient, "grantee": _sub(world, "physician"), "scope": "messaging", "evidence": portal},
        {
            "patient": patient,
            "grantee": "Practitioner/99",
            "scope": "messaging",
            "evidence": portal,
            "valid_until": until,
        },
        {
            "patient": patient,
            "grantee": "RelatedPerson/aunt",
            "scope": "proxy",
            "evidence": portal,
            "valid_until": until,
        },
        {
            "patient": patient,
            "grantee": "Organization/acme",
            "scope": "disclosure",
            "item": "DocumentReference/1",
            "purpose": "TREAT",
            "evidence": {"method": "paper", "document_ref": "scan-0042"},
        },
        {"patient": patient, "grantee": "public", "scope": "public_share", "item": "Binder/7", "evidence": portal},
    ]


def _threads(world: World) -> list[dict[str, Any]]:
    participants = [_sub(world, "physician"), world.references["teams"][0]]
    first = {"body": "Is this normal? " + CANARY}
    return [
        {"patient": _sub(world, "patient"), "participants": participants, "subject": "Dosage " + CANARY},
        {"patient": _sub(world, "patient"), "participants": participants[:1], "subject": "Hi", "message": first},
    ]


def _messages(world: World) -> list[dict[str, Any]]:
    return [
        {"body": "Thank you " + CANARY},
        {
            "body": "See attached " + CANARY,
            "in_reply_to": world.ids["message"],
            "attachment_ids": [world.ids["attachment"]],
        },
    ]


def _replies(world: World) -> list[dict[str, Any]]:
    reply = {"thread_id": world.ids["thread"], "body": "Yes, with food. " + CANARY, "sender": _sub(world, "physician")}
    return [reply, {**reply, "in_reply_to": world.ids["message"]}]


def _endpoints(world: World) -> list[dict[str, Any]]:
    return [{"subscriber": _sub(world, "physician"), "url": WEBHOOK_URL, "event_types": ["message.created"]}]


def _recoveries(world: World) -> list[dict[str, Any]]:
    return [{"since": "2025-01-01T00:00:00Z", "until": "2027-01-01T00:00:00+01:00"}]


def _shreds(world: World) -> list[dict[str, Any]]:
    return [{"patient": _sub(world, "patient"), "confirm": _sub(world, "patient")}]


IDEMPOTENT = {"Idempotency-Key": _idempotency_keys}
BREAK_GLASS = {"Break-Glass-Reason": _break_glass_reasons}
ENDPOINT = {"id": "endpoint"}
DELIVERY = {"id": "endpoint", "delivery_id": "delivery"}

# Who mostly calls each route (any caller, a junk token or none now and then) and what its path names.
FUZZ: dict[str, Fuzz] = {
    "get_health": Fuzz(callers=("patient",)),
    "get_readiness": Fuzz(callers=("patient",)),
    "get_metrics": Fuzz(callers=("patient",)),
    "get_openapi": Fuzz(callers=("patient",)),
    "get_me": Fuzz(callers=CALLERS, claims=True),  # and tokens the portal signed over claims of any value
    "add_issuer_key": Fuzz(callers=("admin",)),
    "list_issuer_keys": Fuzz(callers=("admin",)),
    "revoke_issuer_key": Fuzz(callers=("admin",)),
    "get_key_status": Fuzz(callers=("admin",)),
    "rewrap_keys": Fuzz(callers=("admin",)),
    "shred_patient_key": Fuzz(callers=("admin",), seeds=_shreds),
    "list_audit_events": Fuzz(callers=("compliance",)),
    "get_latest_checkpoint": Fuzz(callers=("compliance",)),
    "get_inclusion_proof": Fuzz(callers=("compliance",)),
    "get_consistency_proof": Fuzz(callers=("compliance",)),
    "list_leaf_hashes": Fuzz(callers=("compliance",)),
    "export_audit_events": Fuzz(callers=("compliance",)),
    "record_consent": Fuzz(callers=("patient", "staff", "physician", "proxy"), headers=IDEMPOTENT, seeds=_consents),
    "revoke_consent": Fuzz(callers=("patient", "proxy", "staff"), ids={"id": "consent"}),
    "get_consent": Fuzz(callers=("patient", "compliance"), ids={"id": "consent"}),
    "list_patient_consents": Fuzz(callers=("patient", "compliance"), ids={"patient_id": "patient"}),
    "create_thread": Fuzz(callers=CARE, headers=IDEMPOTENT, seeds=_threads),
    "list_threads": Fuzz(callers=CARE),
    "get_thread": Fuzz(callers=(*CARE, "outsider"), ids={"id": "thread"}, headers=BREAK_GLASS),
    "close_thread": Fuzz(callers=CARE, ids={"id": "thread"}),
    "send_message": Fuzz(callers=CARE, ids={"id": "thread"}, headers=IDEMPOTENT, seeds=_messages),
    "list_messages": Fuzz(callers=(*CARE, "outsider"), ids={"id": "thread"}, headers=BREAK_GLASS),
    "get_message": Fuzz(callers=CARE, ids={"id": "message"}),
    "mark_read": Fuzz(callers=CARE, ids={"id": "thread"}),
    "recall_message": Fuzz(callers=CARE, ids={"id": "message"}),
    "download_attachment": Fuzz(callers=(*CARE, "outsider"), ids={"id": "attachment"}),
    "list_break_glass": Fuzz(callers=("compliance",)),
    "review_break_glass": Fuzz(callers=("compliance",), ids={"id": "grant"}),
    "create_care_team": Fuzz(callers=("admin",)),
    "set_care_team_members": Fuzz(callers=("admin",), ids={"team_id": "team"}),
    "get_care_team": Fuzz(callers=("admin",), ids={"team_id": "team"}),
    "register_webhook_endpoint": Fuzz(callers=("admin",), seeds=_endpoints),
    "list_webhook_endpoints": Fuzz(callers=("admin",)),
    "get_webhook_endpoint": Fuzz(callers=("admin",), ids=ENDPOINT),
    "update_webhook_endpoint": Fuzz(callers=("admin",), ids=ENDPOINT),
    "delete_webhook_endpoint": Fuzz(callers=("admin",), ids=ENDPOINT),
    "rotate_webhook_secret": Fuzz(callers=("admin",), ids=ENDPOINT),
    "enable_webhook_endpoint": Fuzz(callers=("admin",), ids=ENDPOINT),
    "disable_webhook_endpoint": Fuzz(callers=("admin",), ids=ENDPOINT),
    "list_webhook_deliveries": Fuzz(callers=("admin",), ids=ENDPOINT),
    "get_webhook_delivery": Fuzz(callers=("admin",), ids=DELIVERY),
    "resend_webhook_delivery": Fuzz(callers=("admin",), ids=DELIVERY),
    "recover_webhook_deliveries": Fuzz(callers=("admin",), ids=ENDPOINT, seeds=_recoveries),
    # Public: its credential is the signature of the endpoint's inbound secret, not a token.
    "receive_webhook_reply": Fuzz(callers=("patient",), ids={"endpoint_id": "endpoint"}, signed=True, seeds=_replies),
}

# Routes fuzzed otherwise, and why.
EXEMPT: dict[str, str] = {
    "upload_attachment": "the body is the file, streamed: hand-made cases in test_uploads_* instead",
}

ROUTES_BY_NAME = {route.name: route for route in ROUTES}


def test_every_route_is_fuzzed_or_exempt_with_a_reason() -> None:
    names = set(ROUTES_BY_NAME)
    assert names - set(FUZZ) - set(EXEMPT) == set(), "routes with no fuzz strategy: add them to FUZZ"
    assert set(FUZZ) & set(EXEMPT) == set()
    assert set(FUZZ) | set(EXEMPT) <= names, "FUZZ or EXEMPT names a route the table no longer has"
    assert all(reason.strip() for reason in EXEMPT.values())
    for name, fuzz in FUZZ.items():
        params = {part[1:-1] for part in ROUTES_BY_NAME[name].path.split("/") if part.startswith("{")}
        assert set(fuzz.callers) <= set(CALLERS), name
        assert set(fuzz.ids) <= params, f"{name} names path parameters it does not have"
    kinds = ("patients", "practitioners", "teams", "others")
    world = World({"thread": str(uuid.uuid4())}, {kind: ["Patient/1"] for kind in kinds}, {}, "", "", "")
    known = set(query_params(world))
    for route in ROUTES:
        assert set(route.query_names) <= known, f"{route.name}: add its query parameters to query_params"
        if route.body is not None:
            assert unsupported_fields(route.body) == [], f"{route.name}: add the fields' types to fuzz_helpers"


# -- the service, and a world per route ------------------------------------------------------------------


@dataclass
class Served:
    """The service on loopback, run as `bedside serve` runs it, and what the tests reach it with."""

    session: aiohttp.ClientSession
    host: str
    port: int
    portal: TestIssuer
    owner: asyncpg.Connection
    tables: Tables
    worlds: itertools.count[int]

    def url(self, target: str) -> URL:
        """`target` (path and query, already percent-encoded) exactly as given: yarl neither re-quotes it
        nor resolves its dot segments."""
        return URL(f"http://{self.host}:{self.port}{target}", encoded=True)

    async def request(self, method: str, path: str, **kw: Any) -> aiohttp.ClientResponse:
        response = await self.session.request(method, f"http://{self.host}:{self.port}{path}", **kw)
        await response.read()
        return response


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
    """A database of the module's own with its portal trusted (as the suite's `settings` and `portals`
    fixtures make them), and the service on loopback as `bedside serve` runs it: an AppRunner, whose
    handlers are not cancelled when a client goes away (aiohttp's TestServer cancels them). No webhook
    delivery worker: deliveries stay as they are, and nothing leaves the machine."""
    name = await create_database(cluster, TEMPLATE)
    keys = tmp_path_factory.mktemp("fuzz-keys")
    settings = service_settings(
        cluster.app_dsn(name),
        keys / "kek.json",
        keys / "audit-signing.key",
        webhook_worker=False,
        max_json_body_bytes=BODY_LIMIT,
        admin_issuer_roles=frozenset(Role),  # the issuer route's setup registers a new issuer as an admin
    )
    portal = TestIssuer(tenant="acme", issuer="https://portal.acme.test")
    db = await Database.connect(cluster.app_dsn(name), min_size=1, max_size=2)
    try:
        recorder = AuditRecorder(AuditStore(), db)
        await TenantService(db, TenantStore(), recorder).create(portal.tenant)
        issuers = IssuerService(db, TenantStore(), IssuerStore(), recorder, cache_seconds=0)
        await issuers.add_key(portal.tenant, portal.issuer, portal.public_pem, kid=portal.kid)
    finally:
        await db.close()
    runner = app_runner(create_app(settings), shutdown_timeout=5)
    await runner.setup()
    owner = await asyncpg.connect(cluster.owner_dsn(name))
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        async with aiohttp.ClientSession() as session:
            yield Served(session, host, port, portal, owner, await Tables.of(owner), itertools.count(1))
    finally:
        await owner.close()
        await runner.cleanup()
        await drop_database(cluster, name)


def identities(n: int) -> dict[str, dict[str, str]]:
    """The callers of world `n`: its patient, their proxy, physician and the staff member of their care team
    (of this world only, so that a listing of theirs shows this world alone), and the tenant's officers."""
    return {
        "patient": {"role": "patient", "sub": f"Patient/{n}"},
        "proxy": {"role": "proxy", "sub": f"RelatedPerson/mum-{n}", "act_for": f"Patient/{n}"},
        "physician": {"role": "physician", "sub": f"Practitioner/doc-{n}"},
        "outsider": {"role": "physician", "sub": "Practitioner/99"},  # in no thread: break-glass
        "staff": {"role": "staff", "sub": f"Practitioner/staff-{n}"},
        "compliance": {"role": "compliance", "sub": "Practitioner/c1"},
        "admin": {"role": "admin", "sub": "Practitioner/admin"},
    }


async def build_world(served: Served) -> World:
    """A new patient's world, through the API: their consents (messaging with their physician and care team,
    a proxy), their thread with a message and an attachment, a webhook endpoint of the physician's with
    deliveries, a break-glass grant of an outsider's, and an issuer of its own with a key (`portal-key-1`,
    as the portal's), which the issuer routes name instead of the portal: a revocation stays in the world."""
    n = next(served.worlds)
    who = identities(n)
    patient, physician, staff = who["patient"]["sub"], who["physician"]["sub"], who["staff"]["sub"]
    team = f"CareTeam/cardio-{n}"

    async def call(method: str, path: str, caller: str, **kw: Any) -> Any:
        headers = {**served.portal.auth(**who[caller]), **kw.pop("headers", {})}
        response = await served.request(method, path, headers=headers, **kw)
        text = await response.text()
        assert 200 <= response.status < 300, f"setup {method} {path}: {response.status} {text}"
        return json.loads(text) if text else None

    def consent(grantee: str, **extra: Any) -> dict[str, Any]:
        evidence = {"method": "portal", "text_version": "consent-text-v3"}
        return {"patient": patient, "grantee": grantee, "scope": "messaging", "evidence": evidence, **extra}

    issuer = f"https://portal-{n}.acme.test"
    issuer_key = ed25519.Ed25519PrivateKey.generate().public_key()
    pem = issuer_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    await call(
        "POST",
        "/v1/admin/issuers",
        "admin",
        json={"issuer": issuer, "public_key_pem": pem.decode(), "kid": "portal-key-1"},
    )
    await call("POST", "/v1/admin/care-teams", "admin", json={"team": team, "members": [physician, staff]})
    hook = {"subscriber": physician, "url": WEBHOOK_URL, "event_types": ["message.created", "thread.created"]}
    until = (datetime.now(UTC) + timedelta(days=90)).isoformat()
    endpoint, granted, _, _ = await asyncio.gather(
        call("POST", "/v1/admin/webhook-endpoints", "admin", json=hook),
        call("POST", "/v1/consents", "patient", json=consent(physician)),
        call("POST", "/v1/consents", "patient", json=consent(team)),
        call("POST", "/v1/consents", "patient", json=consent(who["proxy"]["sub"], scope="proxy", valid_until=until)),
    )
    body = {
        "patient": patient,
        "participants": [physician, team],
        "subject": "About my medication",
        "message": {"body": "Can I take it with food?"},
    }
    thread = await call("POST", "/v1/threads", "patient", json=body)
    endpoint_id = endpoint["endpoint"]["id"]
    upload = {"Content-Type": "text/plain; charset=utf-8", "Bedside-File-Name": quote("notes.txt")}
    attachment, _, deliveries = await asyncio.gather(
        call("POST", "/v1/attachments", "patient", params={"thread_id": thread["id"]}, data=b"BP", headers=upload),
        call("GET", f"/v1/threads/{thread['id']}", "outsider", headers={"Break-Glass-Reason": BREAK_GLASS_REASON}),
        call("GET", f"/v1/admin/webhook-endpoints/{endpoint_id}/deliveries", "admin"),
    )
    # Not from the compliance listing: once any patient with a grant is shredded, that listing is a 410.
    grant = await served.owner.fetchval("SELECT id FROM break_glass WHERE thread_id = $1", uuid.UUID(thread["id"]))
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    return World(
        ids={
            "consent": granted["id"],
            "thread": thread["id"],
            "message": thread["message"]["id"],
            "attachment": attachment["id"],
            "grant": str(grant),
            "endpoint": endpoint_id,
            "delivery": deliveries["items"][0]["id"],
            "team": f"cardio-{n}",
            "patient": str(n),
        },
        references={
            "patients": [patient, f"Patient/other-{n}"],
            "practitioners": [physician, staff, "Practitioner/99"],
            "teams": [team],
            "others": [who["proxy"]["sub"], "Organization/acme", "public"],
        },
        identities=who,
        inbound_secret=endpoint["secrets"]["inbound_secret"],
        public_key_pem=key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode(),
        issuer=issuer,
    )


# -- partial writes ------------------------------------------------------------------------------------

_TABLES = """
    SELECT tablename FROM pg_catalog.pg_tables
    WHERE schemaname = 'public' AND tablename NOT LIKE 'audit\\_%' AND tablename <> 'schema_migrations'
    ORDER BY tablename
"""


@dataclass
class Tables:
    """A fingerprint of every table's rows but the audit log's (refusals are audited, by design)."""

    owner: asyncpg.Connection
    query: str

    @classmethod
    async def of(cls, owner: asyncpg.Connection) -> Tables:
        names = [row["tablename"] for row in await owner.fetch(_TABLES)]
        # Table names from the catalog, not from any request.
        parts = [
            f"SELECT '{name}' AS name, md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) AS digest "  # noqa: S608
            f'FROM public."{name}" t'
            for name in names
        ]
        return cls(owner, " UNION ALL ".join(parts))

    async def fingerprint(self) -> dict[str, str]:
        return {row["name"]: row["digest"] for row in await self.owner.fetch(self.query)}


# -- one exchange ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    content_type: str
    headers: Mapping[str, str]
    text: str
    changed: tuple[str, ...]  # tables whose rows the request changed


TIMEOUT = aiohttp.ClientTimeout(total=30)  # a response that never ends is a failure, not a hang


async def exchange(served: Served, request: Request) -> Answer:
    headers = dict(request.headers)
    skip = set()
    if request.content_type is None:
        skip.add("Content-Type")
    else:
        headers["Content-Type"] = request.content_type
    before = await served.tables.fingerprint()
    async with served.session.request(
        request.method,
        served.url(request.target),
        data=request.body,
        headers=headers,
        skip_auto_headers=skip,
        timeout=TIMEOUT,
    ) as response:
        raw = await response.read()
        answer_headers = CIMultiDict(response.headers)
        status, content_type = response.status, response.content_type
    after = await served.tables.fingerprint()
    changed = tuple(sorted(name for name in after if after[name] != before.get(name)))
    return Answer(status, content_type, answer_headers, raw.decode("utf-8", "replace"), changed)


def check(request: Request, answer: Answer) -> None:
    """The rule: never a 5xx; a refusal is a problem document that echoes nothing and changed nothing."""
    where = f"{answer.status} for {request.describe()}\nanswer: {answer.text[:800]}"
    assert answer.status < 500, where
    if answer.status < 400:
        if answer.content_type in ("application/json", "application/fhir+json"):
            json.loads(answer.text)
        elif answer.content_type == "application/x-ndjson":
            for line in answer.text.splitlines():
                json.loads(line)
        return
    assert answer.content_type == "application/problem+json", where
    problem = json.loads(answer.text)
    assert isinstance(problem.get("type"), str), where
    assert problem["type"].startswith("urn:bedside:problem:"), where
    assert isinstance(problem.get("title"), str), where
    assert problem["title"], where
    assert problem.get("status") == answer.status, where
    assert answer.headers.get("X-Request-Id"), where
    assert problem.get("request_id") == answer.headers["X-Request-Id"], where
    assert CANARY not in answer.text, f"the canary is in the error body: {where}"
    assert all(CANARY not in value for value in answer.headers.values()), f"the canary is in a header: {where}"
    assert not answer.changed, f"a refusal changed {answer.changed}: {where}"


# -- every route --------------------------------------------------------------------------------------------


# Shredding last: a shredded patient stays in tenant-wide listings (the compliance officer's break-glass
# review, which then answers 410 as a whole), and the routes fuzzed after it would reach less.
@on_the_module_loop
@pytest.mark.parametrize("name", sorted(FUZZ, key=lambda name: (name == "shred_patient_key", name)))
async def test_no_request_is_a_server_error_or_a_partial_write(name: str, served: Served) -> None:
    # Hypothesis drives synchronous functions and the client lives on the module's loop: the property runs in
    # a worker thread and hands each request to the loop (as in test_errors.py), so shrinking and the example
    # database work. The world is made once for all of the route's examples, on purpose.
    world = await build_world(served)
    loop = asyncio.get_running_loop()

    def auth(who: str, claims: Mapping[str, Any]) -> dict[str, str]:
        # Signed as the portal signs, over whatever JSON the claims make (PyJWT's encode would refuse claims
        # of the wrong type before they could reach the service).
        portal = served.portal
        payload = json.dumps(portal.claims(**{**world.identities[who], **claims})).encode()
        token = jwt.PyJWS().encode(payload, portal.private_key, algorithm=portal.algorithm, headers={"kid": portal.kid})
        return {"Authorization": f"Bearer {token}"}

    @hypothesis_settings(
        max_examples=EXAMPLES,
        deadline=None,
        # Bodies of 70,000 characters and JSON nested 5,000 deep are meant: not a mistake in the strategies.
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    @given(request=requests(ROUTES_BY_NAME[name], FUZZ[name], world, auth, CALLERS))
    def no_server_error(request: Request) -> None:
        answer = asyncio.run_coroutine_threadsafe(exchange(served, request), loop).result(timeout=60)
        check(request, answer)

    # One entry in the example database per route (the property's source is the same for all): what
    # hypothesis's own pytest plugin does for parametrized tests.
    no_server_error.hypothesis.inner_test._hypothesis_internal_add_digest = name.encode()  # type: ignore[attr-defined]
    await asyncio.to_thread(no_server_error)


# -- what the fuzzing found --------------------------------------------------------------------------------

# (caller, method, target as sent, the status now): each was a 500, or a 200 whose stream broke off.
WERE_SERVER_ERRORS = (
    pytest.param("admin", "GET", "/v1/admin/care-teams/cardio%00", 404, id="care-team-path-with-nul"),
    pytest.param("patient", "GET", "/v1/threads?patient=%00", 422, id="thread-listing-patient-nul"),
    pytest.param("physician", "GET", "/v1/threads?patient=Patient%2F1%00", 422, id="thread-listing-patient-ref-nul"),
    pytest.param("admin", "GET", "/v1/admin/webhook-endpoints?subscriber=%00", 422, id="endpoint-listing-nul"),
    pytest.param("compliance", "GET", "/v1/audit/events?patient=%00", 422, id="audit-events-patient-nul"),
    pytest.param("compliance", "GET", "/v1/audit/events?resource_id=a%00b", 422, id="audit-events-resource-nul"),
    # Was a 200 whose stream then broke off (the filter failed in the query run while streaming).
    pytest.param("compliance", "GET", "/v1/audit/export?actor=%00", 422, id="audit-export-actor-nul"),
)


@on_the_module_loop
@pytest.mark.parametrize(("who", "method", "target", "status"), WERE_SERVER_ERRORS)
async def test_requests_that_were_server_errors_are_problems(
    served: Served, who: str, method: str, target: str, status: int
) -> None:
    await _audit_log_has_a_checkpoint(served)  # so that an export has rows to stream
    request = Request(method, target, served.portal.auth(**identities(1)[who]), b"", None)
    answer = await exchange(served, request)
    check(request, answer)
    assert answer.status == status, answer.text


async def _audit_log_has_a_checkpoint(served: Served) -> None:
    headers = served.portal.auth(**identities(1)["compliance"])
    for _ in range(200):
        if (await served.request("GET", "/v1/audit/checkpoints/latest", headers=headers)).status == 200:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the audit log has no checkpoint yet")


# -- header values that are not UTF-8 (aiohttp's client sends only UTF-8) -----------------------------------


@on_the_module_loop
async def test_header_values_that_are_not_utf8_are_4xx(served: Served) -> None:
    world = await build_world(served)
    patient = served.portal.token(**world.identities["patient"]).encode()
    stranger = served.portal.token(role="physician", sub="Practitioner/98").encode()  # no grant yet
    thread, endpoint = world.ids["thread"], world.ids["endpoint"]
    bad = b"\xff\xfe" + CANARY.encode()
    cases = [
        (
            f"GET /v1/threads/{thread}",
            {b"Authorization": b"Bearer " + stranger, b"Break-Glass-Reason": b"In the ED " + bad},
        ),
        (f"POST /v1/threads/{thread}/messages", {b"Authorization": b"Bearer " + patient, b"Idempotency-Key": bad}),
        (
            f"POST /v1/attachments?thread_id={thread}",
            {b"Authorization": b"Bearer " + patient, b"Bedside-File-Name": bad},
        ),
        ("GET /v1/me", {b"Authorization": b"Bearer " + bad}),
        (
            f"POST /v1/inbound/{endpoint}/replies",
            {b"webhook-id": bad, b"webhook-timestamp": bad, b"webhook-signature": bad},
        ),
        (
            "POST /v1/consents",
            {b"Authorization": b"Bearer " + patient, b"Content-Type": b"application/json; charset=" + bad},
        ),
    ]
    for line, headers in cases:
        sent = {b"Content-Type": b"application/json", **headers, b"X-Request-Id": bad}
        head = f"{line} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\nConnection: close\r\n".encode()
        head += b"".join(name + b": " + value + b"\r\n" for name, value in sent.items()) + b"\r\n"
        status, answer_headers, body = await _raw_exchange(served, head, b"{}", hang_up=False)
        assert 400 <= status < 500, (line, status, body[:300])
        assert answer_headers["content-type"] == "application/problem+json", (line, body[:300])
        assert json.loads(body)["status"] == status
        assert CANARY.encode() not in body


# -- uploads: the body is the file, streamed -----------------------------------------------------------------

UPLOAD = "/v1/attachments"


async def _stored(served: Served) -> tuple[int, int]:
    return (
        await served.owner.fetchval("SELECT count(*) FROM attachments"),
        await served.owner.fetchval("SELECT count(*) FROM attachment_chunks"),
    )


@on_the_module_loop
async def test_uploads_of_the_wrong_type_or_shape_are_4xx_and_store_nothing(served: Served) -> None:
    world = await build_world(served)
    patient = served.portal.auth(**world.identities["patient"])
    query = {"thread_id": world.ids["thread"]}
    pdf = b"%PDF-" + CANARY.encode()
    boundary = "fuzz-boundary"
    truncated_multipart = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{CANARY}.pdf"\r\n'
        f"Content-Type: application/pdf\r\n\r\n%PDF-1.7 {CANARY}"
    ).encode()
    cases: list[tuple[str | None, bytes, dict[str, str], dict[str, str]]] = [
        ("application/json", json.dumps({"file": CANARY}).encode(), {}, query),
        (f"multipart/form-data; boundary={boundary}", truncated_multipart, {}, query),
        (f"multipart/form-data; boundary={boundary}", b"", {}, query),
        ("text/html", f"<html>{CANARY}</html>".encode(), {}, query),
        ("image/gif", b"GIF89a" + CANARY.encode(), {}, query),
        ("application/pdf", CANARY.encode(), {}, query),  # not a PDF
        ("image/png", pdf, {}, query),  # a PDF declared as a PNG
        ("text/plain; charset=latin-1", CANARY.encode(), {}, query),
        ("text/plain", b"\xff\xfe" + CANARY.encode(), {}, query),  # not UTF-8
        ("text/plain", CANARY.encode() + b"\x00", {}, query),
        ("text/plain", b"", {}, query),  # empty
        (None, pdf, {}, query),  # no type at all
        ("application/pdf", pdf, {"Bedside-File-Name": ""}, query),
        ("application/pdf", pdf, {"Bedside-File-Name": "%FF%FE"}, query),
        ("application/pdf", pdf, {"Bedside-File-Name": "%00" + quote(CANARY)}, query),
        ("application/pdf", pdf, {"Bedside-File-Name": quote("../" + CANARY)}, query),
        ("application/pdf", pdf, {"Bedside-File-Name": "x" * 4000}, query),
        ("application/pdf", pdf, {}, {"thread_id": CANARY}),
        ("application/pdf", pdf, {}, {"thread_id": world.ids["message"]}),  # no such thread
        ("application/pdf", pdf, {}, {**query, "surprise": CANARY}),
        ("application/pdf", pdf, {}, {}),
    ]
    stored = await _stored(served)
    for content_type, body, extra, params in cases:
        headers = {**patient, "Bedside-File-Name": quote(f"{CANARY}.pdf"), **extra}
        skip = set()
        if content_type is None:
            skip.add("Content-Type")
        else:
            headers["Content-Type"] = content_type
        response = await served.request(
            "POST", UPLOAD, params=params, data=body, headers=headers, skip_auto_headers=skip
        )
        text = await response.text()
        assert 400 <= response.status < 500, (content_type, extra, params, response.status, text)
        assert response.content_type == "application/problem+json", text
        assert json.loads(text)["status"] == response.status
        assert CANARY not in text
        assert await _stored(served) == stored, (content_type, body[:60], extra, params)


async def _raw_exchange(
    served: Served, head: bytes, body: bytes, *, hang_up: bool
) -> tuple[int, dict[str, str], bytes]:
    """Send `head` and `body` over a socket of our own (framing aiohttp's client will not produce) and read
    one answer: (status, headers, body), or (0, {}, b"") when the server closes without answering.
    `hang_up`: the client goes away (half-closes) right after sending."""
    reader, writer = await asyncio.open_connection(served.host, served.port)
    try:
        writer.write(head + body)
        await writer.drain()
        if hang_up and writer.can_write_eof():
            writer.write_eof()
        try:
            raw_head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=30)
        except asyncio.IncompleteReadError:
            return 0, {}, b""
        lines = raw_head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        answer = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), timeout=30)
        return int(lines[0].split(" ")[1]), headers, answer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@on_the_module_loop
async def test_uploads_with_a_huge_declared_length_or_cut_short_are_4xx_and_store_nothing(served: Served) -> None:
    world = await build_world(served)
    token = served.portal.token(**world.identities["patient"])
    target = f"{UPLOAD}?thread_id={world.ids['thread']}"

    def head(framing: str) -> bytes:
        return (
            f"POST {target} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/pdf\r\nBedside-File-Name: {quote(CANARY)}.pdf\r\n{framing}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()

    stored = await _stored(served)
    with capture_logs() as logs:
        # Declared past the limit: refused before the body is read.
        for declared in (26214401, 10**12, 2**63 - 1):
            status, headers, body = await _raw_exchange(
                served, head(f"Content-Length: {declared}"), b"%PDF-" + CANARY.encode(), hang_up=False
            )
            assert status == 413, (declared, status, body[:300])
            assert headers["content-type"] == "application/problem+json"
            assert json.loads(body)["status"] == 413
            assert CANARY.encode() not in body
        # Declared, then cut short: the client goes away mid-body, so it may get no answer at all.
        status, _, body = await _raw_exchange(
            served, head("Content-Length: 100000"), b"%PDF-" + bytes(5000), hang_up=True
        )
        assert status < 500, body[:300]
        # Chunked, with a chunk size that is not one: the HTTP parser refuses the framing, and the server
        # answers for it (the request never reaches a handler) with a 400 problem that quotes nothing.
        broken = b"5\r\n%PDF-\r\nzz\r\n" + CANARY.encode()
        status, headers, body = await _raw_exchange(served, head("Transfer-Encoding: chunked"), broken, hang_up=False)
        assert status == 400, body[:300]
        assert headers["content-type"] == "application/problem+json"
        assert CANARY.encode() not in body
        deadline = time.monotonic() + 30  # until the abandoned upload's handler has ended, and its transaction
        while not (await _stored(served) == stored and _statuses(logs).count(400) == 2):
            assert time.monotonic() < deadline, f"the cut-short upload never ended: {_statuses(logs)}"
            await asyncio.sleep(0.05)
    # What the server answered, whether or not the client was still there to read it: the three 413s, a
    # 400 for the upload cut short, and the parser's 400 for the broken chunk.
    assert sorted(_statuses(logs)) == [400, 400, 413, 413, 413]
    assert not [e for e in logs if e["event"] == "http.unhandled"]
    assert await _stored(served) == stored
    # And the service is fine afterwards.
    ok = await served.request(
        "POST",
        UPLOAD,
        params={"thread_id": world.ids["thread"]},
        data=b"%PDF-1.7 fine",
        headers={
            **served.portal.auth(**world.identities["patient"]),
            "Content-Type": "application/pdf",
            "Bedside-File-Name": "ok.pdf",
        },
    )
    assert ok.status == 201, await ok.text()


def _statuses(logs: list[dict[str, Any]]) -> list[int]:
    return [e["status"] for e in logs if e["event"] == "http.request"]
