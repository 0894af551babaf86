"""The consent ledger: decisions, windows, revocation, proxies, care teams, history, races."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from uuid import UUID

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.domain.audit import AuditRecorder
from service.domain.consents import (
    ConsentLedger,
    ConsentRequest,
    Evidence,
    EvidenceMethod,
    RevokeReason,
    Scope,
    consent_hash,
)
from service.domain.idempotency import RequestFingerprints
from service.domain.principal import Principal, Role
from service.errors import ConflictError, InvalidRequestError, NotFoundError
from service.store.audit import AuditStore
from service.store.consents import ConsentStore
from service.store.idempotency import IdempotencyStore
from tests.conftest import Dsns, Services

PORTAL = Evidence(EvidenceMethod.PORTAL, text_version="consent-text-v3")
PAPER = Evidence(EvidenceMethod.PAPER, document_ref="scan-4711")


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


@dataclass
class World:
    ledger: ConsentLedger
    clock: Clock
    tenant_id: UUID
    services: Services

    def who(self, subject: str, role: Role, act_for: str | None = None) -> Principal:
        return Principal(self.tenant_id, "acme", subject, role, "https://portal.acme.test", act_for)

    @property
    def patient(self) -> Principal:
        return self.who("Patient/1", Role.PATIENT)

    async def set_members(self, team: str, members: set[str]) -> None:
        async with self.services.db.transaction(self.tenant_id) as tx:
            await self.ledger.set_team_members(tx, self.tenant_id, team, members)

    async def decide(self, grantee: str, scope: Scope = Scope.MESSAGING, **kw):
        async with self.services.db.transaction(self.tenant_id) as tx:
            return await self.ledger.decide(tx, "Patient/1", grantee, scope, **kw)


@pytest.fixture
async def world(services: Services) -> World:
    tenant = await services.tenants.create("acme")
    clock = Clock()
    ledger = ConsentLedger(
        services.db,
        ConsentStore(),
        IdempotencyStore(),
        AuditRecorder(AuditStore(), services.db),
        fingerprints=RequestFingerprints(services.keyring),
        clock=clock,
    )
    return World(ledger, clock, tenant.id, services)


def messaging(grantee: str = "Practitioner/7", **kw) -> ConsentRequest:
    return ConsentRequest(patient="Patient/1", grantee=grantee, scope=Scope.MESSAGING, evidence=PORTAL, **kw)


async def test_a_grant_permits_and_a_revoke_denies_the_next_decision(world: World) -> None:
    assert (await world.decide("Practitioner/7")).reason == "no-consent"
    granted = await world.ledger.grant(world.patient, messaging())
    decision = await world.decide("Practitioner/7")
    assert (decision.permit, decision.consent_id) == (True, granted.record.id)
    assert decision.audit_details()["consent_id"] == str(granted.record.id)

    revoked = await world.ledger.revoke(world.patient, granted.record.id, RevokeReason.PATIENT_REQUEST, None)
    decision = await world.decide("Practitioner/7")
    assert (decision.permit, decision.reason, decision.consent_id) == (False, "revoked", revoked.record.id)
    assert (await world.decide("Practitioner/8")).reason == "no-consent"  # another grantee never had one


async def test_validity_windows_follow_the_clock(world: World) -> None:
    start = world.clock.now + timedelta(days=1)
    await world.ledger.grant(world.patient, messaging(valid_from=start, valid_until=start + timedelta(days=10)))
    assert (await world.decide("Practitioner/7")).reason == "not-yet-valid"
    world.clock.now = start + timedelta(days=2)
    assert (await world.decide("Practitioner/7")).permit
    world.clock.now = start + timedelta(days=10)
    assert (await world.decide("Practitioner/7")).reason == "expired"


async def test_a_care_team_consent_covers_its_current_members_only(world: World) -> None:
    await world.ledger.grant(world.patient, messaging("CareTeam/cardio"))
    assert (await world.decide("Practitioner/7")).reason == "no-consent"
    await world.set_members("CareTeam/cardio", {"Practitioner/7"})
    joined_at = datetime.now(UTC)
    assert (await world.decide("Practitioner/7")).permit
    await asyncio.sleep(0.01)
    await world.set_members("CareTeam/cardio", set())
    assert (await world.decide("Practitioner/7")).reason == "no-consent"
    assert (await world.decide("Practitioner/7", at=joined_at)).permit  # but while a member, it was permitted


async def test_proxies_act_within_their_consent_and_its_sensitivity(world: World) -> None:
    too_long = ConsentRequest(
        patient="Patient/1",
        grantee="RelatedPerson/mum",
        scope=Scope.PROXY,
        evidence=PORTAL,
        valid_until=world.clock.now + timedelta(days=600),
    )
    with pytest.raises(InvalidRequestError) as refused:
        await world.ledger.grant(world.patient, too_long)
    assert refused.value.problems[0].type == "proxy-validity"

    await world.ledger.grant(
        world.patient,
        ConsentRequest(
            patient="Patient/1",
            grantee="RelatedPerson/mum",
            scope=Scope.PROXY,
            evidence=PORTAL,
            valid_until=world.clock.now + timedelta(days=365),
        ),
    )
    decision = await world.decide("RelatedPerson/mum", Scope.PROXY)
    assert (decision.permit, decision.include_sensitive) == (True, False)
    assert not (await world.decide("RelatedPerson/dad", Scope.PROXY)).permit


async def test_a_proxy_may_revoke_messaging_only_while_their_proxy_consent_holds(world: World) -> None:
    proxy = world.who("RelatedPerson/mum", Role.PROXY, act_for="Patient/1")
    grant = await world.ledger.grant(world.patient, messaging())
    with pytest.raises(NotFoundError):  # no proxy consent yet
        await world.ledger.revoke(proxy, grant.record.id, RevokeReason.PATIENT_REQUEST, None)
    proxy_grant = await world.ledger.grant(
        world.patient,
        ConsentRequest(
            patient="Patient/1",
            grantee="RelatedPerson/mum",
            scope=Scope.PROXY,
            evidence=PORTAL,
            valid_until=world.clock.now + timedelta(days=30),
        ),
    )
    with pytest.raises(NotFoundError):  # a proxy cannot revoke the proxy consent itself
        await world.ledger.revoke(proxy, proxy_grant.record.id, RevokeReason.PROXY_ENDED, None)
    revoked = await world.ledger.revoke(proxy, grant.record.id, RevokeReason.PATIENT_REQUEST, None)
    assert revoked.record.recorded_by == "RelatedPerson/mum"


async def test_who_may_record_and_with_what_evidence(world: World) -> None:
    staff = world.who("Practitioner/nurse", Role.STAFF)
    with pytest.raises(NotFoundError):  # staff need witnessed evidence, not a click-through
        await world.ledger.grant(staff, messaging())
    recorded = await world.ledger.grant(
        staff, ConsentRequest(patient="Patient/1", grantee="Practitioner/7", scope=Scope.MESSAGING, evidence=PAPER)
    )
    assert recorded.record.evidence == {"method": "paper", "document_ref": "scan-4711"}
    with pytest.raises(NotFoundError):  # a patient records only their own
        await world.ledger.grant(world.who("Patient/2", Role.PATIENT), messaging())
    with pytest.raises(InvalidRequestError):
        await world.ledger.grant(
            world.patient,
            ConsentRequest(patient="Patient/1", grantee="Organization/x", scope=Scope.MESSAGING, evidence=PORTAL),
        )
    with pytest.raises(InvalidRequestError):
        await world.ledger.grant(
            world.patient,
            ConsentRequest(patient="Patient/1", grantee="Organization/x", scope=Scope.DISCLOSURE, evidence=PORTAL),
        )  # no item


async def test_a_racing_grant_and_revoke_end_in_the_later_commit_and_both_are_recorded(
    world: World, database: Dsns
) -> None:
    first_id = (await world.ledger.grant(world.patient, messaging())).record.id
    for _ in range(5):
        results = await asyncio.gather(
            world.ledger.grant(world.patient, messaging()),
            world.ledger.revoke(world.patient, first_id, RevokeReason.PATIENT_REQUEST, None),
            return_exceptions=True,
        )
        assert not [r for r in results if isinstance(r, BaseException) and not isinstance(r, ConflictError)]
        async with world.services.db.transaction(world.tenant_id) as tx:
            events = await ConsentStore().history(tx, world.tenant_id, "Patient/1")
        latest = max(events, key=lambda e: e.version)
        assert [e.version for e in events] == list(range(1, len(events) + 1))  # no two at one version
        assert [e.recorded_at for e in events] == sorted(e.recorded_at for e in events)
        decision = await world.decide("Practitioner/7")
        assert decision.consent_id == latest.id
        assert decision.permit == (latest.kind == "grant")
        if latest.kind == "revoke":  # let the next round start from a grant again
            first_id = (await world.ledger.grant(world.patient, messaging())).record.id
        else:  # the revoke came first: the grant after it is in force
            first_id = latest.id
    owner = await asyncpg.connect(database.owner)
    try:
        recorded = {
            r["resource_id"]: r["details"]
            for r in await owner.fetch(
                "SELECT resource_id, details FROM audit_outbox WHERE action IN ('consent:grant', 'consent:revoke')"
            )
        }
    finally:
        await owner.close()
    assert {str(e.id) for e in events} <= set(recorded)  # every ledger event is also an audit event
    for event in events:
        import json

        assert json.loads(recorded[str(event.id)])["consent_hash"] == consent_hash(event).hex() == event.hash.hex()


async def test_the_same_idempotency_key_records_once(world: World) -> None:
    results = await asyncio.gather(*(world.ledger.grant(world.patient, messaging(), "key-1") for _ in range(20)))
    assert len({r.record.id for r in results}) == 1
    assert sum(1 for r in results if not r.replayed) == 1
    with pytest.raises(InvalidRequestError, match="valid"):
        await world.ledger.grant(world.patient, messaging("Practitioner/other"), "key-1")
    async with world.services.db.transaction(world.tenant_id) as tx:
        assert len(await ConsentStore().history(tx, world.tenant_id, "Patient/1")) == 1


async def test_the_application_role_cannot_alter_the_ledger(world: World, database: Dsns) -> None:
    await world.ledger.grant(world.patient, messaging())
    conn = await asyncpg.connect(database.app)
    try:
        async with conn.transaction():
            await conn.execute("SELECT set_config('bedside.tenant_id', $1, true)", str(world.tenant_id))
            for statement in (
                "UPDATE consent_events SET kind = 'grant'",
                "DELETE FROM consent_events",
                "TRUNCATE consent_events",
            ):
                with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
                    async with conn.transaction():
                        await conn.execute(statement)
    finally:
        await conn.close()


# -- as_of against a model -------------------------------------------------------------------------

OPS = st.lists(
    st.tuples(
        st.sampled_from(["grant", "revoke"]),
        st.sampled_from(["Practitioner/a", "Practitioner/b"]),
        st.integers(min_value=-3, max_value=3),  # window start, in days from recording (None if 0)
        st.integers(min_value=0, max_value=4),  # window length in days (None if 0)
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS, probes=st.lists(st.integers(min_value=0, max_value=10_000), min_size=1, max_size=6))
def test_as_of_matches_a_model_of_the_rules(world: World, ops, probes) -> None:
    """Each example runs on a fresh patient; the model: the latest event per grantee recorded by T, in
    force at T if it is a grant whose window covers T."""
    # Hypothesis drives a synchronous function; the ledger is async: run the example in a fresh loop
    # on a worker thread, since pytest-asyncio's loop is already running.
    import concurrent.futures
    import uuid as uuidlib

    patient = f"Patient/{uuidlib.uuid4().hex[:12]}"

    async def example() -> None:
        from service.store.db import Database

        db = await Database.connect(world.services.db._dsn, min_size=1, max_size=2)
        try:
            ledger = ConsentLedger(
                db,
                ConsentStore(),
                IdempotencyStore(),
                AuditRecorder(AuditStore(), db),
                fingerprints=RequestFingerprints(world.services.keyring),
            )
            principal = Principal(world.tenant_id, "acme", patient, Role.PATIENT, "iss")
            events = []
            for kind, grantee, start, length in ops:
                if kind == "grant":
                    now = datetime.now(UTC)
                    valid_from = now + timedelta(days=start) if start else None
                    valid_until = (valid_from or now) + timedelta(days=length) if length else None
                    view = await ledger.grant(
                        principal,
                        ConsentRequest(
                            patient=patient,
                            grantee=grantee,
                            scope=Scope.MESSAGING,
                            evidence=PORTAL,
                            valid_from=valid_from,
                            valid_until=valid_until,
                        ),
                    )
                    events.append(view.record)
                else:
                    in_force = [e for e in events if e.key.grantee == grantee]
                    if in_force and in_force[-1].kind == "grant":
                        events.append(
                            (await ledger.revoke(principal, in_force[-1].id, RevokeReason.OTHER, None)).record
                        )
            if not events:
                return
            first, last = events[0].recorded_at, events[-1].recorded_at + timedelta(days=8)
            span = (last - first).total_seconds()
            for probe in probes:
                at = first + timedelta(seconds=span * probe / 10_000)
                expected = set()
                for grantee in {e.key.grantee for e in events}:
                    seen = [e for e in events if e.key.grantee == grantee and e.recorded_at <= at]
                    if seen and seen[-1].kind == "grant":
                        e = seen[-1]
                        if (e.valid_from is None or e.valid_from <= at) and (
                            e.valid_until is None or at < e.valid_until
                        ):
                            expected.add(e.id)
                history = await ledger.history(principal, patient, at)
                assert {e.id for e in history.in_force} == expected
        finally:
            await db.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, example()).result()


async def test_concurrent_grants_on_one_key_each_get_their_own_version(world: World) -> None:
    results = await asyncio.gather(*(world.ledger.grant(world.patient, messaging()) for _ in range(10)))
    assert sorted(r.record.version for r in results) == list(range(1, 11))
    latest = max(results, key=lambda r: r.record.version)
    assert (await world.decide("Practitioner/7")).consent_id == latest.record.id


async def test_a_ledger_that_cannot_be_read_denies(world: World, database: Dsns) -> None:
    from service.store.db import Database

    await world.ledger.grant(world.patient, messaging())
    gone = await Database.connect(database.app, min_size=1, max_size=1)
    ledger = ConsentLedger(
        gone,
        ConsentStore(),
        IdempotencyStore(),
        AuditRecorder(AuditStore(), gone),
        fingerprints=RequestFingerprints(world.services.keyring),
    )
    assert (await ledger.decide_now(world.tenant_id, "Patient/1", "Practitioner/7", Scope.MESSAGING)).permit
    await gone.close()  # the database can no longer be reached through it
    decision = await ledger.decide_now(world.tenant_id, "Patient/1", "Practitioner/7", Scope.MESSAGING)
    assert (decision.permit, decision.reason) == (False, "ledger-unavailable")


async def test_a_window_includes_its_first_instant_and_excludes_its_last(world: World) -> None:
    start = world.clock.now + timedelta(days=1)
    end = start + timedelta(days=10)
    granted = await world.ledger.grant(world.patient, messaging(valid_from=start, valid_until=end))
    tick = timedelta(microseconds=1)
    for moment, expected in (
        (start - tick, "not-yet-valid"),
        (start, "granted"),
        (end - tick, "granted"),
        (end, "expired"),
    ):
        world.clock.now = moment
        assert (await world.decide("Practitioner/7")).reason == expected, moment
        assert (await world.decide("Practitioner/7", at=moment)).reason == expected, moment
        in_force = (await world.ledger.history(world.patient, "Patient/1", moment)).in_force
        assert [e.id for e in in_force] == ([granted.record.id] if expected == "granted" else []), moment


async def test_a_window_must_end_after_it_starts(world: World) -> None:
    start = world.clock.now + timedelta(days=1)
    with pytest.raises(InvalidRequestError) as refused:  # a window of no time at all is never in force
        await world.ledger.grant(world.patient, messaging(valid_from=start, valid_until=start))
    assert [(p.loc, p.type) for p in refused.value.problems] == [(("valid_until",), "range")]
    assert (await world.ledger.history(world.patient, "Patient/1")).events == []


async def test_a_direct_consent_decides_before_a_care_teams(world: World) -> None:
    await world.set_members("CareTeam/cardio", {"Practitioner/7"})
    direct = await world.ledger.grant(world.patient, messaging())
    await world.ledger.grant(world.patient, messaging("CareTeam/cardio"))
    decision = await world.decide("Practitioner/7")
    assert (decision.permit, decision.consent_id) == (True, direct.record.id)

    # Denied both ways, the most telling reason is given: the patient revoked it, not that a team's ran out.
    revoked = await world.ledger.revoke(world.patient, direct.record.id, RevokeReason.PATIENT_REQUEST, None)
    await world.ledger.grant(
        world.patient, messaging("CareTeam/cardio", valid_until=world.clock.now + timedelta(days=1))
    )
    world.clock.now += timedelta(days=2)
    decision = await world.decide("Practitioner/7")
    assert (decision.permit, decision.reason, decision.consent_id) == (False, "revoked", revoked.record.id)


async def test_a_proxy_consent_may_end_exactly_at_the_longest_validity_and_not_after(world: World) -> None:
    def proxy(until: datetime) -> ConsentRequest:
        return ConsentRequest(
            patient="Patient/1", grantee="RelatedPerson/mum", scope=Scope.PROXY, evidence=PORTAL, valid_until=until
        )

    longest = world.clock.now + timedelta(days=548)  # the default longest validity of a proxy consent
    with pytest.raises(InvalidRequestError) as refused:
        await world.ledger.grant(world.patient, proxy(longest + timedelta(microseconds=1)))
    assert [(p.loc, p.type) for p in refused.value.problems] == [(("valid_until",), "proxy-validity")]
    granted = await world.ledger.grant(world.patient, proxy(longest))
    assert granted.record.valid_until == longest
    assert (await world.decide("RelatedPerson/mum", Scope.PROXY)).permit


async def test_a_proxy_consent_always_ends_and_only_it_includes_sensitive_threads(world: World) -> None:
    unending = ConsentRequest(patient="Patient/1", grantee="RelatedPerson/mum", scope=Scope.PROXY, evidence=PORTAL)
    with pytest.raises(InvalidRequestError) as refused:
        await world.ledger.grant(world.patient, unending)
    assert [(p.loc, p.type) for p in refused.value.problems] == [(("valid_until",), "proxy-validity")]
    with pytest.raises(InvalidRequestError) as refused:
        await world.ledger.grant(world.patient, messaging(include_sensitive=True))
    assert [(p.loc, p.type) for p in refused.value.problems] == [(("include_sensitive",), "scope")]
    assert (await world.ledger.history(world.patient, "Patient/1")).events == []
    assert not (await world.decide("RelatedPerson/mum", Scope.PROXY)).permit
