"""Who may call what, as one table: every authenticated route x every role x whose resource it is.

The rule (from the access-control issue): a patient reaches their own threads; a proxy the patient's
threads within a `proxy` consent; a physician the threads they take part in, directly or through a care
team; staff their care teams' threads; compliance officers and admins no content at all. Admin routes are
for admins, audit routes for compliance, consents follow the consent rules (`service.domain.policy`).
Anyone else gets 404 (never 403, except 403 consent-required for a missing consent), and the attempt is
audited as `access:denied`.

`MATRIX` holds one row per route of `ROUTES`: the expected status for each role in three scopes,

- own: the resource belongs to or involves the caller as far as the role allows (the patient's thread,
  the proxy's patient's thread, the thread the physician takes part in, the thread of the staff member's
  care team; for admin and compliance their own tenant's admin or audit resources);
- other: the same kind of resource of another patient of the same tenant, in which the caller has no part;
- xtenant: the same kind of resource in the globex tenant, asked for with the caller's acme token.

Globex mirrors acme on purpose: the same Patient/1, Practitioner/7, CareTeam/cardio and proxy, so that only
the tenant tells the resources apart. References in bodies and paths, which do not carry a tenant, name
`Patient/g1` (known to globex only) for the other-tenant scope.

Each route is one test (`parametrize` over the table) that builds the world through the API in a fresh
database, calls every cell, and reports every mismatch at once: the status, the problem code of a 404,
leaked canaries, and the audit event each denial must have left (matched by the request id the cell sends).

Public routes are not in the table: the probes carry nothing, and `POST /v1/inbound/{endpoint_id}/replies`
takes no bearer token at all (its credential is the endpoint's webhook signature, and its sender must be
the endpoint's practitioner or a member of its care team: `tests/webhooks/test_inbound.py`).
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import asyncpg
import pytest

from service.api.routes import ROUTES, Route
from service.domain.audit import decode_entry
from service.domain.principal import Role
from service.settings import Settings
from tests.conftest import Portals
from tests.support import AUDIT_EVENTS, TestIssuer, canary

ROLES = ("patient", "proxy", "physician", "staff", "compliance", "admin")
SCOPES = ("own", "other", "xtenant")
CARE_ROLES = ("patient", "proxy", "physician", "staff")
Codes = tuple[int, int, int]  # own, other, xtenant

# The same references in both tenants: only the tenant tells them apart.
IDENTITIES: dict[str, dict[str, str]] = {
    "patient": {"role": "patient", "sub": "Patient/1"},
    "proxy": {"role": "proxy", "sub": "RelatedPerson/mum", "act_for": "Patient/1"},
    "physician": {"role": "physician", "sub": "Practitioner/7"},
    "staff": {"role": "staff", "sub": "Practitioner/8"},
    "compliance": {"role": "compliance", "sub": "Practitioner/c1"},
    "admin": {"role": "admin", "sub": "Practitioner/admin"},
}
OUTSIDER = {"role": "physician", "sub": "Practitioner/99"}  # opens break-glass grants; never a caller
CARE_TEAM = "CareTeam/cardio"  # Practitioner/7 and the staff member Practitioner/8
PARTICIPANTS = ["Practitioner/7", CARE_TEAM]
PORTAL = {"method": "portal", "text_version": "consent-text-v3"}
PAPER = {"method": "paper", "document_ref": "scan-0042"}
# The patient a scope names where a body or path carries a patient reference.
SCOPE_PATIENT = {"own": "Patient/1", "other": "Patient/2", "xtenant": "Patient/g1"}
BREAK_GLASS_REASON = "Unconscious in the ED, need history"
TEXT = "text/plain; charset=utf-8"
ENDPOINTS = "/v1/admin/webhook-endpoints"
# A public IP literal: registration resolves nothing, and no delivery worker runs here (see `settings`).
WEBHOOK_URL = "https://93.184.215.14/hook"
# Whose endpoint each scope names: own, Patient/1's physician's in acme; other, the cardio team's in acme
# (an admin's scope is the tenant, so both are theirs); xtenant, the mirror physician's in globex.
WEBHOOK_SUBSCRIBER = {"own": "Practitioner/7", "other": CARE_TEAM, "xtenant": "Practitioner/7"}


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """No webhook delivery worker: deliveries stay pending and unleased, so a resend never meets an
    attempt in flight (409) and a delivery reads the same before and after the cells. Admins may register
    new issuers (by default they may not), so that the issuer routes' cells are about who may call them."""
    return settings.model_copy(update={"webhook_worker": False, "admin_issuer_roles": frozenset(Role)})


# -- the world -----------------------------------------------------------------------------------------


@dataclass
class Thread:
    id: str
    message: str  # its first message


@dataclass
class World:
    tenants: dict[str, str]  # slug -> id
    threads: dict[str, Thread]  # scope -> thread
    consents: dict[str, str]  # scope -> a messaging consent of the scope's patient
    secrets: dict[str, list[str]]  # scope -> canaries: thread subjects and message bodies
    globex_ids: set[str]  # every id globex handed out: none may reach an acme caller
    g1_thread: str  # globex's Patient/g1 (a patient acme does not know) has content too
    acme_portal: TestIssuer  # acme's portal key: it endorses another key of its issuer
    close: dict[str, str] = field(default_factory=dict)  # role -> a fresh own thread to close
    recall: dict[str, str] = field(default_factory=dict)  # role -> a message the role sent, unread
    revocable: dict[tuple[str, str], str] = field(default_factory=dict)  # (role, scope) -> consent
    grants: dict[str, str] = field(default_factory=dict)  # scope -> unreviewed break-glass grant
    leaves: dict[str, int] = field(default_factory=dict)  # scope -> an audit leaf of the scope
    attachments: dict[str, str] = field(default_factory=dict)  # scope -> a file in the scope's thread
    endpoints: dict[str, str] = field(default_factory=dict)  # scope -> a webhook endpoint
    deliveries: dict[str, str] = field(default_factory=dict)  # scope -> a delivery of that endpoint
    globex_webhooks: dict[str, Any] = field(default_factory=dict)  # globex's endpoint and delivery as built
    never: list[str] = field(default_factory=list)  # shown once when made, then in no response at all
    tree_size: int = 0

    def forbidden(self, denied: bool) -> list[tuple[str, str]]:
        """(what, string) that must not appear in an acme caller's response: what is not theirs, and in
        a denied cell their own content too; webhook secrets never."""
        scopes = ("own", "other", "xtenant") if denied else ("other", "xtenant")
        found = [(f"the {scope} scope's canary {secret}", secret) for scope in scopes for secret in self.secrets[scope]]
        found += [(f"a webhook secret {secret[:10]}..", secret) for secret in self.never]
        return found + [(f"the globex id {ident}", ident) for ident in sorted(self.globex_ids)]


async def call(client: Any, method: str, path: str, identity: dict[str, str], portal: TestIssuer, **kw: Any) -> Any:
    """A setup step that must succeed (2xx); its JSON body."""
    response = await client.request(method, path, headers={**portal.auth(**identity), **kw.pop("extra", {})}, **kw)
    text = await response.text()
    assert 200 <= response.status < 300, f"setup {method} {path} as {identity['sub']}: {response.status} {text}"
    return json.loads(text) if text else None


def consent_body(patient: str, grantee: str, evidence: dict[str, str] = PORTAL, **extra: Any) -> dict[str, Any]:
    return {"patient": patient, "grantee": grantee, "scope": "messaging", "evidence": evidence, **extra}


def thread_body(patient: str, participants: list[str], subject: str, message: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"patient": patient, "participants": participants, "subject": subject}
    if message is not None:
        body["message"] = {"body": message}
    return body


async def build_world(client: Any, portals: Portals, owner: asyncpg.Connection, needs: frozenset[str]) -> World:
    acme, globex = portals.acme, portals.globex
    patient, admin = IDENTITIES["patient"], IDENTITIES["admin"]
    until = (datetime.now(UTC) + timedelta(days=90)).isoformat()

    async def mirror(portal: TestIssuer) -> tuple[Thread, str, list[str], list[str]]:
        """Patient/1's thread with Practitioner/7 and the cardio team, the consents it needs, a proxy."""
        team = {"team": CARE_TEAM, "members": ["Practitioner/7", "Practitioner/8"]}
        await call(client, "POST", "/v1/admin/care-teams", admin, portal, json=team)
        granted = await asyncio.gather(
            *(
                call(client, "POST", "/v1/consents", patient, portal, json=consent_body("Patient/1", grantee))
                for grantee in PARTICIPANTS
            ),
            call(
                client,
                "POST",
                "/v1/consents",
                patient,
                portal,
                json={**consent_body("Patient/1", "RelatedPerson/mum"), "scope": "proxy", "valid_until": until},
            ),
        )
        secrets = [canary(f"{portal.tenant}-subject"), canary(f"{portal.tenant}-body")]
        body = thread_body("Patient/1", PARTICIPANTS, *secrets)
        created = await call(client, "POST", "/v1/threads", patient, portal, json=body)
        thread = Thread(created["id"], created["message"]["id"])
        return thread, granted[0]["id"], secrets, [thread.id, thread.message, *(g["id"] for g in granted)]

    async def lone_patient(portal: TestIssuer, who: str, practitioner: str) -> tuple[Thread, str, list[str]]:
        """Another patient's thread with a practitioner none of the callers is."""
        identity = {"role": "patient", "sub": who}
        granted = await call(client, "POST", "/v1/consents", identity, portal, json=consent_body(who, practitioner))
        secrets = [canary(f"{who}-subject"), canary(f"{who}-body")]
        body = thread_body(who, [practitioner], *secrets)
        created = await call(client, "POST", "/v1/threads", identity, portal, json=body)
        return Thread(created["id"], created["message"]["id"]), granted["id"], secrets

    (own, own_consent, own_secrets, _), (xt, xt_consent, xt_secrets, xt_ids), other, g1 = await asyncio.gather(
        mirror(acme),
        mirror(globex),
        lone_patient(acme, "Patient/2", "Practitioner/20"),
        lone_patient(globex, "Patient/g1", "Practitioner/g7"),
    )
    tenants = {row["slug"]: str(row["id"]) for row in await owner.fetch("SELECT slug, id FROM tenants")}
    world = World(
        tenants=tenants,
        threads={"own": own, "other": other[0], "xtenant": xt},
        consents={"own": own_consent, "other": other[1], "xtenant": xt_consent},
        secrets={"own": own_secrets, "other": other[2], "xtenant": xt_secrets + g1[2]},
        globex_ids={*xt_ids, g1[0].id, g1[0].message, g1[1]},
        g1_thread=g1[0].id,
        acme_portal=acme,
    )
    steps: list[Awaitable[None]] = []

    if "close" in needs:

        async def close_thread(role: str) -> None:
            body = thread_body("Patient/1", PARTICIPANTS, f"to be closed by {role}", None)
            world.close[role] = (await call(client, "POST", "/v1/threads", patient, acme, json=body))["id"]

        steps += [close_thread(role) for role in ROLES]

    if "recall" in needs:

        async def recall_message(role: str) -> None:
            # A thread of its own per sender, so that no one else's receipt can make a recall too late.
            body = thread_body("Patient/1", PARTICIPANTS, f"started by {role}", f"recall me, {role}")
            created = await call(client, "POST", "/v1/threads", IDENTITIES[role], acme, json=body)
            world.recall[role] = created["message"]["id"]

        steps += [recall_message(role) for role in CARE_ROLES]

    if "revoke" in needs:

        async def revocable(role: str, scope: str) -> None:
            portal = globex if scope == "xtenant" else acme
            who = "Patient/2" if scope == "other" else "Patient/1"
            body = consent_body(who, f"Practitioner/revocable-{role}")
            granted = await call(client, "POST", "/v1/consents", {"role": "patient", "sub": who}, portal, json=body)
            world.revocable[role, scope] = granted["id"]
            if scope == "xtenant":
                world.globex_ids.add(granted["id"])

        steps += [revocable(role, scope) for role in ROLES for scope in SCOPES]

    if "attachments" in needs:

        async def attach(scope: str, portal: TestIssuer, who: str) -> None:
            name, content = canary(f"{scope}-file-name"), canary(f"{scope}-file")
            query = {"thread_id": world.threads[scope].id}
            identity = {"role": "patient", "sub": who}
            sent = await call(
                client,
                "POST",
                "/v1/attachments",
                identity,
                portal,
                params=query,
                data=content.encode(),
                extra={"Content-Type": TEXT, "Bedside-File-Name": quote(name, safe="")},
            )
            world.attachments[scope] = sent["id"]
            world.secrets[scope] += [name, content]

        steps += [
            attach("own", acme, "Patient/1"),
            attach("other", acme, "Patient/2"),
            attach("xtenant", globex, "Patient/1"),
        ]

    if "issuer_keys" in needs:
        for scope, issuer in REVOCABLE_KEYS.items():
            if scope != "xtenant":
                added = TestIssuer(tenant="acme", issuer=issuer)
                key = {"issuer": issuer, "public_key_pem": added.public_pem.decode(), "kid": f"mx-{scope}"}
                if issuer == acme.issuer:  # a second key of the portal's issuer: the portal endorses it
                    key["endorsement"] = acme.endorse(added)
                steps.append(call(client, "POST", "/v1/admin/issuers", admin, acme, json=key))

    if "teams" in needs:
        acme_team = {"team": "CareTeam/neuro", "members": ["Practitioner/20", "Practitioner/21"]}
        globex_team = {"team": "CareTeam/g-onc", "members": ["Practitioner/g7"]}
        steps += [
            call(client, "POST", "/v1/admin/care-teams", admin, acme, json=acme_team),
            call(client, "POST", "/v1/admin/care-teams", admin, globex, json=globex_team),
        ]

    if "webhooks" in needs:

        async def register(scope: str, portal: TestIssuer) -> None:
            token = canary(f"{scope}-url-token")
            body = {
                "subscriber": WEBHOOK_SUBSCRIBER[scope],
                "url": f"{WEBHOOK_URL}?token={token}",
                "event_types": ["message.created"],
            }
            created = await call(client, "POST", ENDPOINTS, admin, portal, json=body)
            world.endpoints[scope] = created["endpoint"]["id"]
            world.never += [created["secrets"]["outbound_secret"], created["secrets"]["inbound_secret"]]
            if scope != "other":  # an admin reads the other endpoint, URL and all: it is their tenant's
                world.secrets[scope].append(token)

        async def webhooks() -> None:
            """An endpoint per scope, then a message in Patient/1's thread of each tenant: one delivery
            to each endpoint (own and other both take part in acme's thread)."""
            await asyncio.gather(*(register(scope, globex if scope == "xtenant" else acme) for scope in SCOPES))
            await asyncio.gather(
                *(
                    call(client, "POST", f"/v1/threads/{t.id}/messages", patient, portal, json={"body": "hook me"})
                    for t, portal in ((world.threads["own"], acme), (world.threads["xtenant"], globex))
                )
            )
            for scope in SCOPES:
                portal = globex if scope == "xtenant" else acme
                listed = await call(client, "GET", f"{ENDPOINTS}/{world.endpoints[scope]}/deliveries", admin, portal)
                (delivery,) = listed["items"]
                world.deliveries[scope] = delivery["id"]
            xt_endpoint, xt_delivery = world.endpoints["xtenant"], world.deliveries["xtenant"]
            world.globex_ids |= {xt_endpoint, xt_delivery, f"msg_{uuid.UUID(xt_delivery).hex}"}
            world.globex_webhooks = await globex_webhooks(client, portals)

        steps.append(webhooks())

    if "break_glass" in needs:
        reason = {"Break-Glass-Reason": BREAK_GLASS_REASON}
        steps += [
            call(client, "GET", f"/v1/threads/{world.threads[scope].id}", OUTSIDER, portal, extra=reason)
            for scope, portal in (("own", acme), ("other", acme), ("xtenant", globex))
        ]

    await asyncio.gather(*steps)

    if "break_glass" in needs:
        by_thread = {
            str(r["thread_id"]): str(r["id"]) for r in await owner.fetch("SELECT id, thread_id FROM break_glass")
        }
        world.grants = {scope: by_thread[thread.id] for scope, thread in world.threads.items()}
        world.globex_ids.add(world.grants["xtenant"])

    if "attachments" in needs:
        world.globex_ids.add(world.attachments["xtenant"])

    if "audit" in needs:
        await integrated(client)
        acme_id, globex_id = tenants["acme"], tenants["globex"]
        leaf = "SELECT min(seq) FROM audit_leaves WHERE tenant_id = $1 AND ($2::text IS NULL OR patient = $2)"
        world.leaves = {
            "own": await owner.fetchval(leaf, acme_id, "Patient/1"),
            "other": await owner.fetchval(leaf, acme_id, "Patient/2"),
            "xtenant": await owner.fetchval(leaf, globex_id, None),
        }
        world.tree_size = await owner.fetchval("SELECT size FROM audit_tree_state")
    return world


async def integrated(client: Any) -> None:
    for _ in range(200):
        if (await (await client.get("/readyz")).json())["audit_backlog"] == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the sequencer did not integrate the backlog")


# -- the table -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    ids: dict[str, str] = field(default_factory=dict)  # path parameters
    json: Any = None
    query: dict[str, str] | None = None
    data: bytes | None = None  # a raw body (an upload), sent with `headers`
    headers: dict[str, str] = field(default_factory=dict)


Check = Callable[[World, str, str, str], str | None]  # (world, role, scope, body) -> a problem or None
PostCheck = Callable[[Any, Portals, World], Awaitable[list[str]]]


@dataclass(frozen=True)
class Row:
    expect: dict[str, Codes]  # role -> (own, other, xtenant)
    call: Callable[[World, str, str], Call] = lambda w, role, scope: Call()
    needs: frozenset[str] = frozenset()
    destructive: bool = False  # denied cells run first, so that a wrong success cannot hide behind a 409
    check: Check | None = None  # on a 2xx that was expected
    post: PostCheck | None = None  # after every cell: what must not have changed
    note: str = ""


DENIED: Codes = (404, 404, 404)


def only(**by_role: Codes) -> dict[str, Codes]:
    """The roles named get these codes; every other role is denied (404) in every scope."""
    return {role: by_role.get(role, DENIED) for role in ROLES}


def everyone(codes: Codes) -> dict[str, Codes]:
    return dict.fromkeys(ROLES, codes)


def care(ok: int) -> dict[str, Codes]:
    """Thread content: the four care roles in their own thread only; compliance and admin never."""
    return only(**dict.fromkeys(CARE_ROLES, (ok, 404, 404)))


def thread_id(w: World, role: str, scope: str) -> Call:
    return Call(ids={"id": w.threads[scope].id})


def scope_patient_query(w: World, role: str, scope: str) -> Call:
    return Call(query={"patient": SCOPE_PATIENT[scope]})


def tenant_of_events(w: World, role: str, scope: str, body: str) -> str | None:
    entries = [base64.b64decode(item["entry"]) for item in json.loads(body)["items"]]
    strangers = [e for e in entries if decode_entry(e)["tenant_id"] != w.tenants["acme"]]
    return f"{len(strangers)} event(s) of another tenant" if strangers else None


def tenant_of_export(w: World, role: str, scope: str, body: str) -> str | None:
    lines = [json.loads(line) for line in body.splitlines() if line.strip()]
    strangers = [x for x in lines if x.get("type") == "event" and x.get("tenant_id") != w.tenants["acme"]]
    return f"{len(strangers)} exported event(s) of another tenant" if strangers else None


def listed_threads(w: World, role: str, scope: str, body: str) -> str | None:
    listed = {item["id"] for item in json.loads(body)["items"]}
    wanted = {w.threads["own"].id} if scope == "own" and role in CARE_ROLES else set()
    return None if listed == wanted else f"listed {sorted(listed)}, expected {sorted(wanted)}"


def only_acme_issuers(w: World, role: str, scope: str, body: str) -> str | None:
    issuers = {item["issuer"] for item in json.loads(body)["items"]}
    return None if issuers == {"https://portal.acme.test"} else f"issuers {sorted(issuers)}"


def only_acme_grants(w: World, role: str, scope: str, body: str) -> str | None:
    listed = {item["id"] for item in json.loads(body)["items"]}
    wanted = {w.grants["own"], w.grants["other"]}
    return None if listed == wanted else f"grants {sorted(listed)}, expected {sorted(wanted)}"


# Whose key each scope's revocation names: own, a second key of acme's portal; other, the key of a second
# issuer of acme; xtenant, globex's portal and its kid, which acme does not know.
REVOCABLE_KEYS = {
    "own": "https://portal.acme.test",
    "other": "https://second-portal.acme.test",
    "xtenant": "https://portal.globex.test",
}


def revocable_key(w: World, role: str, scope: str) -> Call:
    kid = "portal-key-1" if scope == "xtenant" else f"mx-{scope}"
    return Call(json={"issuer": REVOCABLE_KEYS[scope], "kid": kid})


def issuer_key(w: World, role: str, scope: str) -> Call:
    issuer = {
        "own": "https://portal.acme.test",  # another key of the tenant's own portal
        "other": "https://second-portal.acme.test",  # another issuer of the same tenant
        "xtenant": "https://portal.globex.test",  # globex's issuer and kid, trusted in acme only
    }[scope]
    kid = "portal-key-1" if scope == "xtenant" else f"mx-{role}-{scope}"
    added = TestIssuer(tenant="acme", issuer=issuer)
    key = {"issuer": issuer, "public_key_pem": added.public_pem.decode(), "kid": kid}
    if scope == "own":  # another key of the portal's issuer: endorsed by the portal's key, as it must be
        key["endorsement"] = w.acme_portal.endorse(added)
    return Call(json=key)


def new_consent(w: World, role: str, scope: str) -> Call:
    # The evidence that would make the request succeed for the role, were it allowed: portal for a
    # patient (or a proxy acting in the portal), witnessed paper for everyone else.
    evidence = PORTAL if role in ("patient", "proxy") else PAPER
    return Call(json=consent_body(SCOPE_PATIENT[scope], f"Practitioner/mx-{role}-{scope}", evidence))


def new_thread(w: World, role: str, scope: str) -> Call:
    bodies = {
        "own": thread_body("Patient/1", PARTICIPANTS, f"matrix: {role}", "matrix first message"),
        "other": thread_body("Patient/2", ["Practitioner/20"], f"matrix: {role}", "matrix first message"),
        "xtenant": thread_body("Patient/g1", ["Practitioner/g7"], f"matrix: {role}", "matrix first message"),
    }
    return Call(json=bodies[scope])


def audit_proof(kind: str) -> Callable[[World, str, str], Call]:
    def build(w: World, role: str, scope: str) -> Call:
        leaf = w.leaves[scope]
        query = {
            "inclusion": {"index": leaf, "size": w.tree_size},
            "consistency": {"from": leaf + 1, "to": w.tree_size},
            "leaves": {"start": leaf, "end": leaf + 1},
        }[kind]
        return Call(query={k: str(v) for k, v in query.items()})

    return build


def team_path(w: World, role: str, scope: str) -> Call:
    return Call(ids={"team_id": {"own": "cardio", "other": "neuro", "xtenant": "g-onc"}[scope]})


def team_members(w: World, role: str, scope: str) -> Call:
    # The members the team already has: an allowed call changes nothing the other cells rely on.
    members = {
        "own": ["Practitioner/7", "Practitioner/8"],
        "other": ["Practitioner/20", "Practitioner/21"],
        "xtenant": ["Practitioner/g7"],
    }[scope]
    return Call(ids=team_path(w, role, scope).ids, json={"members": members})


def new_team(w: World, role: str, scope: str) -> Call:
    team, members = {
        "own": (f"CareTeam/mx-{role}", ["Practitioner/7", "Practitioner/8"]),
        "other": (f"CareTeam/mx-{role}-other", ["Practitioner/20"]),
        "xtenant": ("CareTeam/g-onc", ["Practitioner/7"]),  # exists in globex only
    }[scope]
    return Call(json={"team": team, "members": members})


async def globex_issuers_untouched(client: Any, portals: Portals, w: World) -> list[str]:
    listed = await call(client, "GET", "/v1/admin/issuers", IDENTITIES["admin"], portals.globex)
    keys = [(k["issuer"], k["kid"], k["revoked_at"]) for k in listed["items"]]  # the listing shows revoked keys too
    untouched = [("https://portal.globex.test", "portal-key-1", None)]
    return [] if keys == untouched else [f"globex issuer keys now {keys}"]


async def globex_team_untouched(client: Any, portals: Portals, w: World) -> list[str]:
    team = await call(client, "GET", "/v1/admin/care-teams/g-onc", IDENTITIES["admin"], portals.globex)
    return [] if team["members"] == ["Practitioner/g7"] else [f"globex CareTeam/g-onc now {team['members']}"]


async def globex_content_readable(client: Any, portals: Portals, w: World) -> list[str]:
    problems = []
    for who, thread in (("Patient/1", w.threads["xtenant"].id), ("Patient/g1", w.g1_thread)):
        response = await client.get(
            f"/v1/threads/{thread}/messages", headers=portals.globex.auth(role="patient", sub=who)
        )
        if response.status != 200:
            problems.append(f"globex {who}'s messages now answer {response.status}: shredded across tenants")
    return problems


async def globex_webhooks(client: Any, portals: Portals) -> dict[str, Any]:
    """Globex's endpoints, each with its deliveries, as globex's admin sees them."""
    admin = IDENTITIES["admin"]
    seen: dict[str, Any] = {}
    for endpoint in (await call(client, "GET", ENDPOINTS, admin, portals.globex))["items"]:
        path = f"{ENDPOINTS}/{endpoint['id']}/deliveries"
        listed = await call(client, "GET", path, admin, portals.globex)
        seen[endpoint["id"]] = {
            "endpoint": endpoint,
            "deliveries": [
                await call(client, "GET", f"{path}/{d['id']}", admin, portals.globex) for d in listed["items"]
            ],
        }
    return seen


async def globex_webhooks_untouched(client: Any, portals: Portals, w: World) -> list[str]:
    now = await globex_webhooks(client, portals)
    return [] if now == w.globex_webhooks else [f"globex's webhooks were {w.globex_webhooks}, now {now}"]


def only_acme_endpoints(w: World, role: str, scope: str, body: str) -> str | None:
    listed = {item["id"] for item in json.loads(body)["items"]}
    wanted = {w.endpoints["own"], w.endpoints["other"]}
    return None if listed == wanted else f"endpoints {sorted(listed)}, expected {sorted(wanted)}"


def only_the_delivery(w: World, role: str, scope: str, body: str) -> str | None:
    listed = [item["id"] for item in json.loads(body)["items"]]
    return None if listed == [w.deliveries[scope]] else f"deliveries {listed}, expected [{w.deliveries[scope]}]"


def endpoint_id(w: World, role: str, scope: str) -> Call:
    return Call(ids={"id": w.endpoints[scope]})


def delivery_ids(w: World, role: str, scope: str) -> Call:
    return Call(ids={"id": w.endpoints[scope], "delivery_id": w.deliveries[scope]})


def new_endpoint(w: World, role: str, scope: str) -> Call:
    # Subscribers carry no tenant: xtenant names Practitioner/g7, whom only globex knows, and the
    # endpoint is made in acme, the token's tenant, and only there.
    subscriber = {"own": "Practitioner/7", "other": "Practitioner/20", "xtenant": "Practitioner/g7"}[scope]
    return Call(json={"subscriber": subscriber, "url": WEBHOOK_URL, "event_types": ["message.created"]})


WEBHOOKS = frozenset({"webhooks"})


async def globex_ledger_untouched(client: Any, portals: Portals, w: World) -> list[str]:
    compliance = IDENTITIES["compliance"]
    history = await call(client, "GET", "/v1/patients/g1/consents", compliance, portals.globex)
    count = len(history["history"])
    return [] if count == 1 else [f"globex Patient/g1 has {count} consent events, expected 1"]


MATRIX: dict[str, Row] = {
    # -- identity
    "get_me": Row(everyone((200, 200, 200)), note="no resource: the caller itself, whatever the scope"),
    # -- administration: admins only, always their own tenant (the token names it; nothing else can)
    "add_issuer_key": Row(
        only(admin=(201, 201, 201)),
        issuer_key,
        post=globex_issuers_untouched,
        note="other: a second issuer of acme; xtenant: globex's issuer and kid, trusted by acme alone",
    ),
    "list_issuer_keys": Row(only(admin=(200, 200, 200)), check=only_acme_issuers, note="no scope in the request"),
    "revoke_issuer_key": Row(
        only(admin=(200, 200, 404)),
        revocable_key,
        needs=frozenset({"issuer_keys"}),
        destructive=True,
        post=globex_issuers_untouched,
        note="own: a second key of acme's portal, other: a second issuer's key, xtenant: globex's (unknown in acme)",
    ),
    "get_key_status": Row(only(admin=(200, 200, 200)), note="no scope in the request"),
    "rewrap_keys": Row(only(admin=(202, 202, 202)), note="no scope in the request"),
    "shred_patient_key": Row(
        only(admin=(200, 200, 404)),
        lambda w, role, scope: Call(json={"patient": SCOPE_PATIENT[scope], "confirm": SCOPE_PATIENT[scope]}),
        destructive=True,
        post=globex_content_readable,
        note="an admin shreds any patient of their tenant; Patient/g1 has no key in acme: 404",
    ),
    "create_care_team": Row(
        only(admin=(201, 201, 201)),
        new_team,
        needs=frozenset({"teams"}),
        destructive=True,
        post=globex_team_untouched,
        note="xtenant: a team named like globex's only one, created in acme and only there",
    ),
    "set_care_team_members": Row(
        only(admin=(200, 200, 404)),
        team_members,
        needs=frozenset({"teams"}),
        post=globex_team_untouched,
        note="own: cardio (of Patient/1's thread), other: neuro, xtenant: globex's g-onc (not in acme)",
    ),
    "get_care_team": Row(
        only(admin=(200, 200, 404)),
        team_path,
        needs=frozenset({"teams"}),
        note="as set_care_team_members: cardio, neuro, and globex's g-onc, which acme does not have",
    ),
    # -- webhooks: admins only (policy.can_manage_webhooks); own is Practitioner/7's endpoint, other the
    #    cardio team's (both acme's: an admin's scope is the tenant), xtenant globex's, unknown in acme
    "register_webhook_endpoint": Row(
        only(admin=(201, 201, 201)),
        new_endpoint,
        needs=WEBHOOKS,
        post=globex_webhooks_untouched,
        note="xtenant: for Practitioner/g7 (globex's only), made in acme and only there",
    ),
    "list_webhook_endpoints": Row(
        only(admin=(200, 200, 200)),
        needs=WEBHOOKS,
        post=globex_webhooks_untouched,
        check=only_acme_endpoints,
        note="no scope in the request: acme's two endpoints, never globex's",
    ),
    "get_webhook_endpoint": Row(
        only(admin=(200, 200, 404)),
        endpoint_id,
        needs=WEBHOOKS,
        post=globex_webhooks_untouched,
        note="the URL is shown to the admin (own and other); secrets never",
    ),
    "update_webhook_endpoint": Row(
        only(admin=(200, 200, 404)),
        lambda w, role, scope: Call(ids=endpoint_id(w, role, scope).ids, json={"event_types": ["message.created"]}),
        needs=WEBHOOKS,
        post=globex_webhooks_untouched,
        note="the event types it already has: an allowed call changes nothing the other cells rely on",
    ),
    "delete_webhook_endpoint": Row(
        only(admin=(204, 204, 404)),
        endpoint_id,
        needs=WEBHOOKS,
        post=globex_webhooks_untouched,
        destructive=True,
        note="admin's own and other cells delete acme's two endpoints; globex's stays",
    ),
    "rotate_webhook_secret": Row(
        only(admin=(201, 201, 404)),
        lambda w, role, scope: Call(ids=endpoint_id(w, role, scope).ids, json={"purpose": "ed25519"}),
        needs=WEBHOOKS,
        post=globex_webhooks_untouched,
        note="an Ed25519 key, whose public key the endpoint then shows: globex's must show none",
    ),
    "enable_webhook_endpoint": Row(
        only(admin=(200, 200, 404)),
        endpoint_id,
        needs=WEBHOOKS,
        post=globex_webhooks_untouched,
        note="enabling an enabled endpoint changes nothing",
    ),
    "disable_webhook_endpoint": Row(
        only(admin=(200, 200, 404)),
        endpoint_id,
        needs=WEBHOOKS,
        post=globex_webhooks_untouched,
        note="disabling is idempotent; globex's endpoint must stay enabled",
    ),
    "list_webhook_deliveries": Row(
        only(admin=(200, 200, 404)),
        endpoint_id,
        needs=WEBHOOKS,
        post=globex_webhooks_untouched,
        check=only_the_delivery,
        note="each endpoint has one delivery: the message.created of its tenant's Patient/1 thread",
    ),
    "get_webhook_delivery": Row(
        only(admin=(200, 200, 404)),
        delivery_ids,
        needs=WEBHOOKS,
        post=globex_webhooks_untouched,
        note="the scope's endpoint and its delivery",
    ),
    "resend_webhook_delivery": Row(
        only(admin=(202, 202, 404)),
        delivery_ids,
        needs=WEBHOOKS,
        post=globex_webhooks_untouched,
        note="no worker runs here, so no attempt is ever in flight (that would be 409)",
    ),
    "recover_webhook_deliveries": Row(
        only(admin=(202, 202, 404)),
        lambda w, role, scope: Call(
            ids=endpoint_id(w, role, scope).ids,
            json={
                "since": (datetime.now(UTC) - timedelta(days=1)).isoformat(),
                "until": (datetime.now(UTC) + timedelta(days=1)).isoformat(),
            },
        ),
        needs=WEBHOOKS,
        post=globex_webhooks_untouched,
        note="a day either side of now: nothing is dead-lettered, so it recovers 0, but only in acme",
    ),
    # -- audit: compliance only; the log's proofs and leaf hashes are shared and carry no tenant's data
    "list_audit_events": Row(
        only(compliance=(200, 200, 200)),
        scope_patient_query,
        needs=frozenset({"audit"}),
        check=tenant_of_events,
        note="filtered by the scope's patient; the other-tenant filter must find acme's events only",
    ),
    "get_latest_checkpoint": Row(only(compliance=(200, 200, 200)), needs=frozenset({"audit"}), note="no scope"),
    "get_inclusion_proof": Row(
        only(compliance=(200, 200, 200)),
        audit_proof("inclusion"),
        needs=frozenset({"audit"}),
        note="a leaf of the scope (globex's leaf too: the Merkle log is shared, hashes carry nothing)",
    ),
    "get_consistency_proof": Row(
        only(compliance=(200, 200, 200)),
        audit_proof("consistency"),
        needs=frozenset({"audit"}),
        note="from the tree just after the scope's leaf to the whole tree",
    ),
    "list_leaf_hashes": Row(
        only(compliance=(200, 200, 200)),
        audit_proof("leaves"),
        needs=frozenset({"audit"}),
        note="the scope's leaf alone",
    ),
    "export_audit_events": Row(
        only(compliance=(200, 200, 200)),
        scope_patient_query,
        needs=frozenset({"audit"}),
        check=tenant_of_export,
        note="as list_audit_events: every exported event must be acme's",
    ),
    "list_break_glass": Row(
        only(compliance=(200, 200, 200)),
        needs=frozenset({"break_glass"}),
        check=only_acme_grants,
        note="no scope in the request: always the caller's tenant's grants, never globex's",
    ),
    "review_break_glass": Row(
        only(compliance=(204, 204, 404)),
        lambda w, role, scope: Call(ids={"id": w.grants[scope]}),
        needs=frozenset({"break_glass"}),
        destructive=True,
        note="own: a grant on Patient/1's thread, other: on Patient/2's, xtenant: globex's grant",
    ),
    # -- consents: policy.can_record_consent, can_revoke_consent, can_read_consents
    "record_consent": Row(
        only(patient=(201, 404, 404), physician=(201, 201, 201), staff=(201, 201, 201)),
        new_consent,
        post=globex_ledger_untouched,
        note="physician and staff record for any patient with witnessed evidence, into acme's ledger only",
    ),
    "revoke_consent": Row(
        only(patient=(200, 404, 404), proxy=(200, 404, 404), staff=(200, 200, 404)),
        lambda w, role, scope: Call(
            ids={"id": w.revocable[role, scope]},
            json={"reason": "patient-request", "evidence": PAPER},
        ),
        needs=frozenset({"revoke"}),
        destructive=True,
        note="one messaging consent per cell; staff with witnessed evidence may revoke any patient's",
    ),
    "get_consent": Row(
        only(patient=(200, 404, 404), compliance=(200, 200, 404)),
        lambda w, role, scope: Call(ids={"id": w.consents[scope]}),
        note="a messaging consent of the scope's patient; compliance reads any of its own tenant",
    ),
    "list_patient_consents": Row(
        only(patient=(200, 404, 404), compliance=(200, 200, 200)),
        lambda w, role, scope: Call(ids={"patient_id": SCOPE_PATIENT[scope].split("/")[1]}),
        note="xtenant: Patient/g1, of whom acme knows nothing: compliance gets an empty history",
    ),
    # -- messaging: policy.thread_access
    "create_thread": Row(
        care(201),
        new_thread,
        note="other/xtenant: the thread that patient would start with their own (consented) practitioner",
    ),
    "list_threads": Row(
        everyone((200, 200, 200)),
        lambda w, role, scope: Call(query=None if scope == "own" else {"patient": SCOPE_PATIENT[scope]}),
        check=listed_threads,
        note="a listing, not a resource: 200 with nothing in it for compliance, admin and strangers",
    ),
    "get_thread": Row(care(200), thread_id, note="physicians: without a Break-Glass-Reason header"),
    "close_thread": Row(
        care(200),
        lambda w, role, scope: Call(ids={"id": w.close[role] if scope == "own" else w.threads[scope].id}),
        needs=frozenset({"close"}),
        destructive=True,
        note="own: a fresh thread of Patient/1 per cell",
    ),
    "send_message": Row(
        care(201),
        lambda w, r, s: Call(ids=thread_id(w, r, s).ids, json={"body": "matrix"}),
        note="every participant's messaging consent is in force in all three threads",
    ),
    "list_messages": Row(care(200), thread_id, note="physicians: without a Break-Glass-Reason header"),
    "get_message": Row(
        care(200), lambda w, role, scope: Call(ids={"id": w.threads[scope].message}), note="the thread's first message"
    ),
    "mark_read": Row(
        care(200),
        lambda w, r, s: Call(ids=thread_id(w, r, s).ids, json={"up_to": 1}),
        note="up to the first message, which every thread has",
    ),
    "recall_message": Row(
        care(200),
        lambda w, role, scope: Call(
            ids={"id": w.recall.get(role, w.threads["own"].message) if scope == "own" else w.threads[scope].message}
        ),
        needs=frozenset({"recall"}),
        destructive=True,
        note="own: a message the caller sent (compliance and admin send none: Patient/1's first message)",
    ),
}


# Attachments are being wired in as this table is written: their rows are ready, and join the table as
# soon as routes.py lists the routes (until then they would be rows of routes that do not exist).
PENDING: dict[str, Row] = {
    "upload_attachment": Row(
        care(201),
        lambda w, role, scope: Call(
            query={"thread_id": w.threads[scope].id},
            data=b"matrix attachment",
            headers={"Content-Type": TEXT, "Bedside-File-Name": "matrix.txt"},
        ),
        note="a UTF-8 text file into the scope's thread (the raw body; the thread is in the query)",
    ),
    "download_attachment": Row(
        care(200),
        lambda w, role, scope: Call(ids={"id": w.attachments[scope]}),
        needs=frozenset({"attachments"}),
        note="a file the scope's patient uploaded into their thread; physicians without break-glass",
    ),
}
AUTHENTICATED = {route.name: route for route in ROUTES if not route.public}
MATRIX.update({name: row for name, row in PENDING.items() if name in AUTHENTICATED})


# -- running a row -------------------------------------------------------------------------------------


@dataclass
class Cell:
    role: str
    scope: str
    expected: int
    status: int = 0
    request_id: str = ""
    problems: list[str] = field(default_factory=list)


def request_id(route: Route, role: str, scope: str) -> str:
    return f"mx-{route.name}-{role}-{scope}"


def problem_code(body: str) -> str | None:
    try:
        return str(json.loads(body).get("code"))
    except (ValueError, AttributeError):
        return None


async def run_cell(client: Any, portals: Portals, world: World, route: Route, row: Row, cell: Cell) -> None:
    spec = row.call(world, cell.role, cell.scope)
    cell.request_id = request_id(route, cell.role, cell.scope)
    response = await client.request(
        route.method,
        route.path.format(**spec.ids),
        json=spec.json,
        data=spec.data,
        params=spec.query,
        headers={**portals.acme.auth(**IDENTITIES[cell.role]), **spec.headers, "X-Request-Id": cell.request_id},
    )
    body = await response.text()
    cell.status = response.status
    if cell.status != cell.expected:
        cell.problems.append(f"status {cell.status}, expected {cell.expected}: {body[:160]}")
    elif cell.expected == 404 and (code := problem_code(body)) != "not-found":
        cell.problems.append(f"404 with code {code!r}, not the plain not-found of an unknown route")
    elif cell.expected < 300 and row.check is not None and (problem := row.check(world, cell.role, cell.scope, body)):
        cell.problems.append(problem)
    denied = cell.expected >= 400
    for label, secret in world.forbidden(denied):
        if secret in body:
            cell.problems.append(f"the response holds {label}")


# Each cell sends its own X-Request-Id: the events keep it as the `client_request_id` detail.
AUDIT_ROWS = f"SELECT * FROM {AUDIT_EVENTS} WHERE details->>'client_request_id' = ANY($1)"  # noqa: S608


async def check_audit(owner: asyncpg.Connection, world: World, cells: list[Cell]) -> None:
    """Every denial left an `access:denied` event by the caller in acme; every allowed call none."""
    events: dict[str, list[asyncpg.Record]] = {}
    for event in await owner.fetch(AUDIT_ROWS, [c.request_id for c in cells]):
        events.setdefault(json.loads(event["details"])["client_request_id"], []).append(event)
    for cell in cells:
        actor = IDENTITIES[cell.role]["sub"]
        mine = events.get(cell.request_id, [])
        denials = [e for e in mine if e["outcome"] == "denied"]
        if cell.expected == 404:
            wanted = [
                e
                for e in denials
                if e["action"] == "access:denied"
                and e["actor"] == actor
                and str(e["tenant_id"]) == world.tenants["acme"]
            ]
            if not wanted:
                seen = [(e["action"], e["outcome"]) for e in mine]
                cell.problems.append(f"no access:denied event by {actor} (events of the request: {seen})")
        elif cell.expected == 403:
            if not any(json.loads(e["details"]).get("reason") == "consent-required" for e in denials):
                cell.problems.append("no denied event with reason consent-required")
        elif any(e["action"] == "access:denied" for e in denials):
            cell.problems.append("an allowed call recorded access:denied")


def report(route: Route, row: Row, cells: list[Cell], post_problems: list[str]) -> str:
    grid = {(c.role, c.scope): c for c in cells}
    lines = [
        f"{route.method} {route.path} ({route.name}): {row.note}",
        "",
        f"{'':12}" + "".join(f"{s:>16}" for s in SCOPES),
    ]
    for role in ROLES:
        marks = []
        for scope in SCOPES:
            cell = grid[role, scope]
            mark = str(cell.status) if cell.status == cell.expected else f"{cell.status}≠{cell.expected}"
            marks.append(f"{mark + ('*' if cell.problems else ''):>16}")
        lines.append(f"{role:12}" + "".join(marks))
    lines += ["", "(* = a problem below; a≠b: got a, the table expects b)", ""]
    lines += [f"{c.role}/{c.scope} [{c.request_id}]: {p}" for c in cells for p in c.problems]
    lines += [f"afterwards: {p}" for p in post_problems]
    return "\n".join(lines)


@pytest.mark.parametrize("name", sorted(AUTHENTICATED.keys() | MATRIX.keys()))
async def test_authorization_matrix(name: str, client, portals: Portals, database) -> None:
    route, row = AUTHENTICATED.get(name), MATRIX.get(name)
    assert route is not None, f"the table has a row for {name}, which is not an authenticated route (any more)"
    assert row is not None, f"{route.method} {route.path} ({name}) has no row in MATRIX: add one"
    assert set(row.expect) == set(ROLES)

    owner = await asyncpg.connect(database.owner)
    try:
        world = await build_world(client, portals, owner, row.needs)
        cells = [Cell(role, scope, row.expect[role][i]) for role in ROLES for i, scope in enumerate(SCOPES)]
        order = sorted(cells, key=lambda c: c.expected < 300) if row.destructive else cells
        for cell in order:
            await run_cell(client, portals, world, route, row, cell)
        await check_audit(owner, world, cells)
        post_problems = await row.post(client, portals, world) if row.post else []
    finally:
        await owner.close()

    if any(c.problems for c in cells) or post_problems:
        pytest.fail(report(route, row, cells, post_problems), pytrace=False)
