"""The pure access rules of threads, as one table: who may do what with a thread, and why."""

from __future__ import annotations

from uuid import uuid4

import pytest

from service.domain.policy import Access, Standing, ThreadFacts, can_start_thread, thread_access
from service.domain.principal import Principal, Role

TENANT = uuid4()
THREAD = ThreadFacts("Patient/1", frozenset({"Practitioner/7", "CareTeam/cardio"}), sensitive=False)
SENSITIVE = ThreadFacts("Patient/1", frozenset({"Practitioner/7"}), sensitive=True)


def who(role: Role, subject: str, act_for: str | None = None) -> Principal:
    return Principal(TENANT, "acme", subject, role, "iss", act_for)


TEAM = Standing(teams=frozenset({"CareTeam/cardio"}))
PROXY = Standing(proxy_permit=True)
PROXY_SENSITIVE = Standing(proxy_permit=True, proxy_sensitive=True)
GLASS = Standing(break_glass=True)

# (principal, thread, standing, expected, why)
TABLE = [
    (who(Role.PATIENT, "Patient/1"), THREAD, Standing(), Access.WRITE, "the patient's own thread"),
    (who(Role.PATIENT, "Patient/2"), THREAD, Standing(), Access.NONE, "another patient's"),
    (who(Role.PROXY, "RelatedPerson/m", "Patient/1"), THREAD, PROXY, Access.WRITE, "within a proxy consent"),
    (who(Role.PROXY, "RelatedPerson/m", "Patient/1"), THREAD, Standing(), Access.NONE, "no proxy consent"),
    (who(Role.PROXY, "RelatedPerson/m", "Patient/2"), THREAD, PROXY, Access.NONE, "acting for someone else"),
    (who(Role.PROXY, "RelatedPerson/m", "Patient/1"), SENSITIVE, PROXY, Access.NONE, "sensitive, not included"),
    (who(Role.PROXY, "RelatedPerson/m", "Patient/1"), SENSITIVE, PROXY_SENSITIVE, Access.WRITE, "sensitive, included"),
    (who(Role.PHYSICIAN, "Practitioner/7"), THREAD, Standing(), Access.WRITE, "a direct participant"),
    (who(Role.PHYSICIAN, "Practitioner/9"), THREAD, TEAM, Access.WRITE, "through a participating care team"),
    (who(Role.PHYSICIAN, "Practitioner/9"), THREAD, Standing(), Access.NONE, "not part of it"),
    (who(Role.PHYSICIAN, "Practitioner/9"), THREAD, GLASS, Access.READ, "break-glass: reading only"),
    (who(Role.STAFF, "Practitioner/n"), THREAD, TEAM, Access.WRITE, "their care team's thread"),
    (who(Role.STAFF, "Practitioner/7"), THREAD, Standing(), Access.NONE, "staff only through care teams"),
    (who(Role.STAFF, "Practitioner/n"), THREAD, GLASS, Access.NONE, "break-glass is for physicians"),
    (who(Role.COMPLIANCE, "Practitioner/c"), THREAD, TEAM, Access.NONE, "compliance: no content"),
    (who(Role.ADMIN, "Practitioner/a"), THREAD, TEAM, Access.NONE, "admin: no content"),
]


@pytest.mark.parametrize(("principal", "thread", "standing", "expected", "why"), TABLE, ids=[row[-1] for row in TABLE])
def test_thread_access(
    principal: Principal, thread: ThreadFacts, standing: Standing, expected: Access, why: str
) -> None:
    assert thread_access(principal, thread, standing) is expected, why


@pytest.mark.parametrize(
    ("principal", "standing", "sensitive", "expected"),
    [
        (who(Role.PATIENT, "Patient/1"), Standing(), True, True),
        (who(Role.PROXY, "RelatedPerson/m", "Patient/1"), PROXY, False, True),
        (who(Role.PROXY, "RelatedPerson/m", "Patient/1"), PROXY, True, False),
        (who(Role.PROXY, "RelatedPerson/m", "Patient/1"), PROXY_SENSITIVE, True, True),
        (who(Role.PHYSICIAN, "Practitioner/7"), Standing(), False, True),
        (who(Role.PHYSICIAN, "Practitioner/8"), Standing(), False, False),
        (who(Role.PHYSICIAN, "Practitioner/8"), TEAM, False, True),  # through a participating care team
        (who(Role.STAFF, "Practitioner/7"), Standing(), False, False),  # staff only through care teams
        (who(Role.STAFF, "Practitioner/n"), TEAM, False, True),
        (who(Role.COMPLIANCE, "Practitioner/c"), TEAM, False, False),
    ],
)
def test_who_may_start_a_thread(principal: Principal, standing: Standing, sensitive: bool, expected: bool) -> None:
    participants = frozenset({"Practitioner/7", "CareTeam/cardio"})
    assert can_start_thread(principal, "Patient/1", participants, standing, sensitive=sensitive) is expected
