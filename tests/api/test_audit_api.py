"""The compliance officer's audit API, checked the way an outside auditor would: proofs verified with an
RFC 9162 verifier written here from the RFC's algorithms, exports verified offline by the CLI."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from crypto.checkpoint import verify_checkpoint
from crypto.merkle import decode_fields, encode_fields, leaf_hash
from service.domain.audit import AuditAction, AuditEvent
from tests.conftest import Portals, Services
from tests.support import TestIssuer

COMPLIANCE = {"role": "compliance", "sub": "Practitioner/c1"}
BEDSIDE = str(Path(sys.executable).parent / "bedside")


# -- RFC 9162 §2.1, independently of crypto/merkle.py ------------------------------------------------


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def mth(leaves: list[bytes]) -> bytes:
    """MTH(D[n]) over leaf hashes, recursively as §2.1.1 defines it."""
    if not leaves:
        return _h(b"")
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return _h(b"\x01" + mth(leaves[:k]) + mth(leaves[k:]))


def rfc_verify_inclusion(index: int, size: int, leaf: bytes, path: list[bytes], root: bytes) -> bool:
    """§2.1.3.2."""
    if index >= size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = _h(b"\x01" + p + r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = _h(b"\x01" + r + p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def rfc_verify_consistency(first: int, second: int, first_hash: bytes, second_hash: bytes, path: list[bytes]) -> bool:
    """§2.1.4.2 (for 0 < first < second)."""
    if not path:
        return False
    if first & (first - 1) == 0:
        path = [first_hash, *path]
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = _h(b"\x01" + c + fr)
            sr = _h(b"\x01" + c + sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = _h(b"\x01" + sr + c)
        fn >>= 1
        sn >>= 1
    return fr == first_hash and sr == second_hash and sn == 0


# -- helpers -----------------------------------------------------------------------------------------


async def _record(services: Services, tenant: str, n: int, patient: str | None = None) -> None:
    record = await services.tenants.get(tenant)
    recorder = services.keys._audit  # the same AuditRecorder type the service uses
    for i in range(n):
        await recorder.record_alone(
            AuditEvent.by_operator(
                AuditAction.KEY_STATUS, tenant_id=record.id, patient=patient, resource_id=f"{tenant}-{i}"
            )
        )


async def _integrated(client) -> None:
    for _ in range(200):
        body = await (await client.get("/readyz")).json()
        if body["audit_backlog"] == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the sequencer did not integrate the backlog")


async def _all(client, headers, **params) -> list[dict]:
    items, cursor = [], None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        body = await (await client.get("/v1/audit/events", params=query, headers=headers)).json()
        items += body["items"]
        cursor = body.get("next_cursor")
        if not cursor:
            return items


# -- tests ----------------------------------------------------------------------------------------


async def test_a_compliance_officer_sees_only_their_tenants_events(
    client, portals: Portals, services: Services
) -> None:
    await _record(services, "acme", 5)
    await _record(services, "globex", 7)
    await _integrated(client)

    acme = await _all(client, portals.acme.auth(**COMPLIANCE), action="key:status")
    globex = await _all(client, portals.globex.auth(**COMPLIANCE), action="key:status")

    assert sorted(e["resource_id"] for e in acme) == [f"acme-{i}" for i in range(5)]
    assert sorted(e["resource_id"] for e in globex) == sorted(f"globex-{i}" for i in range(7))


@pytest.mark.parametrize("role", ["patient", "physician", "staff", "admin", "proxy"])
async def test_other_roles_see_no_audit_route_and_are_audited(client, portals: Portals, role: str) -> None:
    sub = {"patient": "Patient/1", "proxy": "RelatedPerson/1"}.get(role, "Practitioner/1")
    extra = {"act_for": "Patient/1"} if role == "proxy" else {}
    headers = portals.acme.auth(role=role, sub=sub, **extra)
    for path in ("/v1/audit/events", "/v1/audit/checkpoints/latest", "/v1/audit/export"):
        assert (await client.get(path, headers=headers)).status == 404
    await _integrated(client)
    denied = await _all(client, portals.acme.auth(**COMPLIANCE), action="access:denied")
    assert len([e for e in denied if e["actor"] == sub]) == 3
    assert {e["details"]["reason"] for e in denied} == {"role"}


async def test_queries_are_themselves_audited(client, portals: Portals) -> None:
    headers = portals.acme.auth(**COMPLIANCE)
    await client.get("/v1/audit/events", headers=headers)
    await _integrated(client)
    queries = await _all(client, headers, action="audit:query")
    assert queries
    assert queries[-1]["actor"] == "Practitioner/c1"
    assert queries[-1]["details"]["query"] == "events"


async def test_a_query_or_export_records_whose_trail_was_read(client, portals: Portals) -> None:
    headers = portals.acme.auth(**COMPLIANCE)
    asked = {"patient": "Patient/3", "action": "message:read", "since": "2026-01-01T00:00:00+00:00"}
    assert (await client.get("/v1/audit/events", params=asked, headers=headers)).status == 200
    exported = await client.get("/v1/audit/export", params={"patient": "Patient/3"}, headers=headers)
    assert exported.status == 200
    await exported.read()
    await _integrated(client)
    # The looks at Patient/3's trail are in Patient/3's trail, with what was asked for.
    trail = await _all(client, headers, patient="Patient/3")
    looks = {e["action"]: e for e in trail if e["action"] in ("audit:query", "audit:export")}
    assert set(looks) == {"audit:query", "audit:export"}
    assert looks["audit:query"]["details"] == {
        "query": "events",
        "returned": 0,
        "filter_action": "message:read",
        "filter_since": "2026-01-01T00:00:00+00:00",
    }
    assert looks["audit:export"]["details"] == {}
    assert {e["actor"] for e in looks.values()} == {"Practitioner/c1"}


async def test_failed_authentication_is_the_tenants_audit_event(client, portals: Portals) -> None:
    expired = portals.acme.token(exp=1, iat=0)
    assert (await client.get("/v1/me", headers={"Authorization": f"Bearer {expired}"})).status == 401
    await _integrated(client)
    denied = await _all(client, portals.acme.auth(**COMPLIANCE), action="auth:denied")
    assert [(e["outcome"], e["details"]["reason"], e["issuer"]) for e in denied] == [
        ("denied", "expired", "https://portal.acme.test")
    ]


async def test_filters_and_pages_never_skip_or_repeat(client, portals: Portals, services: Services) -> None:
    await _record(services, "acme", 23, patient="Patient/9")
    await _record(services, "acme", 4, patient="Patient/8")
    await _integrated(client)
    headers = portals.acme.auth(**COMPLIANCE)

    for order in ("newest", "oldest"):
        # (action too: each page's own audit:query is Patient/9's event as well, and joins the trail)
        items = await _all(client, headers, patient="Patient/9", action="key:status", limit="5", order=order)
        seqs = [e["seq"] for e in items]
        assert len(seqs) == 23
        assert len(set(seqs)) == 23
        assert seqs == sorted(seqs, reverse=order == "newest")
    first = await (await client.get("/v1/audit/events", params={"limit": "2"}, headers=headers)).json()
    wrong_order = await client.get(
        "/v1/audit/events", params={"cursor": first["next_cursor"], "order": "oldest"}, headers=headers
    )
    assert wrong_order.status == 422
    bad = await client.get("/v1/audit/events", params={"limit": "0", "bogus": "1"}, headers=headers)
    assert bad.status == 422


async def test_proofs_verify_with_an_independent_rfc_9162_verifier(
    client, portals: Portals, services: Services
) -> None:
    await _record(services, "acme", 45)
    await _record(services, "globex", 30)
    await _integrated(client)
    headers = portals.acme.auth(**COMPLIANCE)
    checkpoint = await (await client.get("/v1/audit/checkpoints/latest", headers=headers)).json()
    signed = verify_checkpoint(checkpoint["note"], checkpoint["vkey"])
    assert (signed.size, signed.root_hash.hex()) == (checkpoint["size"], checkpoint["root"])

    leaves_body = await (
        await client.get("/v1/audit/leaves", params={"start": "0", "end": str(signed.size)}, headers=headers)
    ).json()
    leaves = [bytes.fromhex(item["leaf_hash"]) for item in leaves_body["items"]]
    assert len(leaves) == signed.size
    assert mth(leaves) == signed.root_hash

    rng = random.Random(9162)
    for _ in range(40):
        size = rng.randint(1, signed.size)
        index = rng.randrange(size)
        body = await (
            await client.get("/v1/audit/proofs/inclusion", params={"index": index, "size": size}, headers=headers)
        ).json()
        path = [bytes.fromhex(p) for p in body["proof"]]
        assert rfc_verify_inclusion(index, size, leaves[index], path, mth(leaves[:size]))
        assert not rfc_verify_inclusion(index, size, _h(b"forged"), path, mth(leaves[:size]))

        first = rng.randint(1, size - 1) if size > 1 else 1
        if first < size:
            body = await (
                await client.get("/v1/audit/proofs/consistency", params={"from": first, "to": size}, headers=headers)
            ).json()
            proof = [bytes.fromhex(p) for p in body["proof"]]
            assert rfc_verify_consistency(first, size, mth(leaves[:first]), mth(leaves[:size]), proof)
            assert not rfc_verify_consistency(first, size, _h(b"other history"), mth(leaves[:size]), proof)

    too_big = await client.get(
        "/v1/audit/proofs/inclusion", params={"index": 0, "size": signed.size + 1_000_000}, headers=headers
    )
    assert too_big.status == 422


async def test_an_export_verifies_offline_and_a_tampered_one_does_not(
    client, portals: Portals, services: Services, tmp_path: Path
) -> None:
    await _record(services, "acme", 12, patient="Patient/3")
    await _record(services, "globex", 5)
    await _integrated(client)
    headers = portals.acme.auth(**COMPLIANCE)
    response = await client.get("/v1/audit/export", params={"format": "ndjson"}, headers=headers)
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("application/x-ndjson")
    lines = (await response.text()).splitlines()
    header = json.loads(lines[0])
    events = [json.loads(line) for line in lines[1:]]
    assert header["type"] == "checkpoint"
    assert {e["tenant_id"] for e in events} == {events[0]["tenant_id"]}  # acme's only
    assert sum(1 for e in events if e["patient"] == "Patient/3") == 12

    ok = await _verify_export(lines, tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"ok: {len(events)} leaves" in ok.stdout

    victim = events[4]
    victim["actor"] = "Practitioner/someone-else"
    bad = await _verify_export([lines[0], *(json.dumps(e) for e in events)], tmp_path)
    assert bad.returncode == 1
    assert f"FAILED at index {victim['seq']}" in bad.stdout


async def test_an_exported_event_rewritten_with_its_entry_fails_on_its_hash_or_its_inclusion_proof(
    client, portals: Portals, services: Services, tmp_path: Path
) -> None:
    # The event's columns and its entry agree, re-encoded by a forger: with the stored leaf hash kept, the
    # entry does not hash to it; with the hash recomputed, only the proof against the signed root tells.
    await _record(services, "acme", 6, patient="Patient/3")
    await _integrated(client)
    response = await client.get(
        "/v1/audit/export", params={"format": "ndjson"}, headers=portals.acme.auth(**COMPLIANCE)
    )
    lines = (await response.text()).splitlines()
    events = [json.loads(line) for line in lines[1:]]
    assert all("proof" in e for e in events)
    assert (await _verify_export(lines, tmp_path)).returncode == 0

    victim = next(e for e in events if e["patient"] == "Patient/3")
    fields = decode_fields(base64.b64decode(victim["entry"]))
    entry = encode_fields([(name, "Patient/4" if name == "patient" else value) for name, value in fields])
    victim.update(patient="Patient/4", entry=base64.b64encode(entry).decode())
    for rehashed, problem in ((False, "does not hash to its leaf hash"), (True, "not included in the signed tree")):
        if rehashed:
            victim["leaf_hash"] = leaf_hash(entry).hex()
        bad = await _verify_export([lines[0], *(json.dumps(e) for e in events)], tmp_path)
        assert bad.returncode == 1
        assert f"FAILED at index {victim['seq']}" in bad.stdout
        assert problem in bad.stdout


async def test_the_fhir_export_validates_as_r4_audit_events(client, portals: Portals, services: Services) -> None:
    from fhir.resources.R4B.auditevent import AuditEvent as FhirAuditEvent

    await _record(services, "acme", 3, patient="Patient/3")
    await client.get("/v1/me", headers={"Authorization": "Bearer nonsense"})
    await _integrated(client)
    response = await client.get("/v1/audit/export", params={"format": "fhir"}, headers=portals.acme.auth(**COMPLIANCE))
    resources = [json.loads(line) for line in (await response.text()).splitlines()]
    assert len(resources) >= 3
    for resource in resources:
        FhirAuditEvent.model_validate(resource)
    with_patient = [r for r in resources if any("Patient/3" in json.dumps(e) for e in r.get("entity", []))]
    assert len(with_patient) == 3


async def test_the_audit_write_failing_stops_the_work(client, portals: Portals, services: Services, database) -> None:
    tenant = await services.tenants.get("acme")
    async with services.db.transaction(tenant.id) as tx:
        sealed = await services.keyring.seal_for(tx, "Patient/1", b"still here", {"column": "test.body"})
    owner = await asyncpg.connect(database.owner)
    try:
        await owner.execute("REVOKE INSERT ON audit_outbox FROM bedside_app")
        response = await client.post(
            "/v1/admin/keys/shred",
            json={"patient": "Patient/1", "confirm": "Patient/1"},
            headers=portals.acme.auth(role="admin", sub="Practitioner/a1"),
        )
        assert response.status == 503
        assert (await response.json())["code"] == "audit-unavailable"
    finally:
        await owner.execute("GRANT INSERT ON audit_outbox TO bedside_app")
        await owner.close()
    async with services.db.transaction(tenant.id) as tx:
        assert await services.keyring.open(tx, sealed, {"column": "test.body"}) == b"still here"


async def test_an_event_is_integrated_within_two_seconds_of_its_commit(
    aiohttp_client, settings, portals: Portals
) -> None:
    import time

    from service.app import create_app

    client = await aiohttp_client(create_app(settings.model_copy(update={"audit_batch_interval_seconds": 0.25})))
    headers = portals.acme.auth(**COMPLIANCE)
    await client.get("/v1/audit/events", headers=headers)  # let the sequencer take the lead first
    await _integrated(client)
    worst = 0.0
    for _ in range(5):
        committed = time.monotonic()
        response = await client.get("/v1/me", headers={"Authorization": f"Bearer {portals.acme.token(exp=1, iat=0)}"})
        assert response.status == 401  # its auth:denied event has committed when the answer comes
        for _ in range(500):  # polls every 10 ms, gives up after 5 s
            if not (await (await client.get("/readyz")).json())["audit_backlog"]:
                break
            await asyncio.sleep(0.01)
        worst = max(worst, time.monotonic() - committed)
    assert worst < 2.0


async def test_a_time_range_returns_exactly_the_events_within_it(client, portals: Portals, services: Services) -> None:
    from datetime import UTC, datetime

    await _record(services, "acme", 3, patient="Patient/5")
    start = datetime.now(UTC)
    await _record(services, "acme", 4, patient="Patient/5")
    end = datetime.now(UTC)
    await _record(services, "acme", 2, patient="Patient/5")
    await _integrated(client)
    headers = portals.acme.auth(**COMPLIANCE)
    for order in ("newest", "oldest"):
        items = await _all(
            client, headers, action="key:status", since=start.isoformat(), until=end.isoformat(), order=order, limit="3"
        )
        assert sorted(e["resource_id"] for e in items) == [f"acme-{i}" for i in range(4)]
        assert [e["seq"] for e in items] == sorted((e["seq"] for e in items), reverse=order == "newest")


async def _verify_export(lines: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    export, vkey = tmp_path / "export.ndjson", tmp_path / "log.vkey"
    export.write_text("\n".join(lines) + "\n")
    vkey.write_text(json.loads(lines[0])["vkey"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEDSIDE_")}
    return await asyncio.to_thread(
        subprocess.run,
        [BEDSIDE, "audit", "verify", "--file", str(export), "--public-key", str(vkey)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


async def test_the_tokens_jti_is_recorded_with_its_actor_and_verifies(
    client, portals: Portals, services: Services, tmp_path: Path
) -> None:
    from fhir.resources.R4B.auditevent import AuditEvent as FhirAuditEvent

    await _record(services, "acme", 2)  # no token: entries in the encoding every earlier leaf has
    jti = f"jti-{random.getrandbits(64):016x}"
    patient = portals.acme.auth(role="patient", sub="Patient/1", jti=jti)
    grant = {
        "patient": "Patient/1",
        "grantee": "Practitioner/7",
        "scope": "messaging",
        "evidence": {"method": "portal", "text_version": "v3"},
    }
    assert (await client.post("/v1/consents", json=grant, headers=patient)).status == 201
    assert (await client.get("/v1/audit/events", headers=patient)).status == 404  # a refusal carries it too
    await _integrated(client)

    headers = portals.acme.auth(**COMPLIANCE)
    events = await _all(client, headers, actor="Patient/1")
    assert {(e["action"], e["outcome"], e["token_id"]) for e in events} == {
        ("consent:grant", "success", jti),
        ("access:denied", "denied", jti),
    }
    operator = await _all(client, headers, action="key:status")
    assert [e["token_id"] for e in operator] == [None, None]

    lines = (await (await client.get("/v1/audit/export", headers=headers)).text()).splitlines()
    exported = [json.loads(line) for line in lines[1:]]
    assert {e["token_id"] for e in exported if e["actor"] == "Patient/1"} == {jti}
    ok = await _verify_export(lines, tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr

    victim = next(e for e in exported if e["actor"] == "Patient/1")
    victim["token_id"] = "jti-of-another-token"
    bad = await _verify_export([lines[0], *(json.dumps(e) for e in exported)], tmp_path)
    assert bad.returncode == 1
    assert f"FAILED at index {victim['seq']}" in bad.stdout

    fhir = await client.get("/v1/audit/export", params={"format": "fhir", "actor": "Patient/1"}, headers=headers)
    resources = [json.loads(line) for line in (await fhir.text()).splitlines()]
    assert len(resources) == 2
    for resource in resources:
        FhirAuditEvent.model_validate(resource)
        (user,) = [a for a in resource["agent"] if a["requestor"]]
        assert user["policy"] == [f"urn:ietf:params:oauth:jti:{jti}"]


async def test_the_key_that_verified_the_token_is_recorded_with_its_actor_and_verifies(
    client, portals: Portals, services: Services, tmp_path: Path
) -> None:
    from fhir.resources.R4B.auditevent import AuditEvent as FhirAuditEvent

    # A second key under the portal's issuer name: its events must not look like the portal's own.
    added = TestIssuer(tenant="acme", issuer=portals.acme.issuer, kid="added-key")
    await services.issuers.add_key("acme", added.issuer, added.public_pem, kid=added.kid)
    await _record(services, "acme", 2)  # the operator's: no token, no key
    grant = {
        "patient": "Patient/1",
        "grantee": "Practitioner/7",
        "scope": "messaging",
        "evidence": {"method": "portal", "text_version": "v3"},
    }
    assert (await client.post("/v1/consents", json=grant, headers=portals.acme.auth())).status == 201
    assert (await client.get("/v1/audit/events", headers=added.auth())).status == 404  # a refusal names it too
    expired = added.token(iat=0, exp=1)  # the key verified the signature; the token was refused all the same
    assert (await client.get("/v1/me", headers={"Authorization": f"Bearer {expired}"})).status == 401
    await _integrated(client)

    headers = portals.acme.auth(**COMPLIANCE)
    events = await _all(client, headers)
    assert {(e["action"], e["outcome"], e["key_id"]) for e in events} == {
        ("tenant:create", "success", None),
        ("issuer:add", "success", None),
        ("key:status", "success", None),
        ("consent:grant", "success", "portal-key-1"),
        ("access:denied", "denied", "added-key"),
        ("auth:denied", "denied", "added-key"),
    }
    assert [e["key_id"] for e in events if e["action"] == "key:status"] == [None, None]

    lines = (await (await client.get("/v1/audit/export", headers=headers)).text()).splitlines()
    exported = [json.loads(line) for line in lines[1:]]
    assert {e["key_id"] for e in exported if e["actor"] == "Patient/1"} == {"portal-key-1", "added-key"}
    ok = await _verify_export(lines, tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr

    victim = next(e for e in exported if e["key_id"] == "added-key")
    victim["key_id"] = "portal-key-1"  # passing an added key's event off as the portal's
    bad = await _verify_export([lines[0], *(json.dumps(e) for e in exported)], tmp_path)
    assert bad.returncode == 1
    assert f"FAILED at index {victim['seq']}" in bad.stdout

    fhir = await client.get("/v1/audit/export", params={"format": "fhir", "action": "consent:grant"}, headers=headers)
    (resource,) = [json.loads(line) for line in (await fhir.text()).splitlines()]
    FhirAuditEvent.model_validate(resource)
    (issuer,) = [a for a in resource["agent"] if a["who"] == {"identifier": {"value": portals.acme.issuer}}]
    assert issuer["extension"] == [{"url": "urn:bedside:signing-key", "valueString": "portal-key-1"}]
