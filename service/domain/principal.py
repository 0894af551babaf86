"""Who is calling: the authenticated principal every use case receives."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from uuid import UUID

# FHIR-style references as EHRs hand them out: `Patient/123`, `Practitioner/abc`, `CareTeam/x`.
FHIR_REFERENCE = re.compile(r"^[A-Z][A-Za-z]{1,63}/[A-Za-z0-9\-.]{1,64}$")


class Role(StrEnum):
    PATIENT = "patient"
    PROXY = "proxy"
    PHYSICIAN = "physician"
    STAFF = "staff"
    COMPLIANCE = "compliance"
    ADMIN = "admin"


ALL_ROLES: frozenset[Role] = frozenset(Role)


def parse_roles(text: str) -> frozenset[Role]:
    """Role names separated by commas (`patient,proxy`; spaces around a name are ignored), as a set. A
    blank text is the empty set. Raises ValueError for any other name or an empty item; the message names
    the roles there are, never the text (it may come from a setting)."""
    if not text.strip():
        return frozenset()
    names = [name.strip() for name in text.split(",")]
    if not all(name in _ROLE_NAMES for name in names):
        raise ValueError(f"roles are role names separated by commas, each one of {', '.join(_ROLE_NAMES)}")
    return frozenset(Role(name) for name in names)


def role_names(roles: Iterable[Role | str]) -> tuple[str, ...]:
    """Role names in their canonical order (patient first, admin last), each once."""
    wanted = {str(role) for role in roles}
    return tuple(name for name in _ROLE_NAMES if name in wanted)


_ROLE_NAMES = tuple(role.value for role in Role)

# The resource type a subject must have for each role; None allows any FHIR reference.
SUBJECT_TYPE: dict[Role, str | None] = {
    Role.PATIENT: "Patient",
    Role.PROXY: "RelatedPerson",
    Role.PHYSICIAN: "Practitioner",
    Role.STAFF: None,
    Role.COMPLIANCE: None,
    Role.ADMIN: None,
}


def is_reference(value: object, resource_type: str | None = None) -> bool:
    """Whether `value` is a FHIR-style reference (of `resource_type`, when given)."""
    if not isinstance(value, str) or not FHIR_REFERENCE.fullmatch(value):
        return False
    return resource_type is None or value.split("/", 1)[0] == resource_type


def is_plain_text(value: object, limit: int) -> bool:
    """A non-empty printable string of at most `limit` characters that encodes as UTF-8 (no lone
    surrogates, no NUL): safe to store and to compare, and never a way to break a query or a log line."""
    if not isinstance(value, str) or not 1 <= len(value) <= limit or not value.isprintable():
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller within one tenant. `act_for` is the patient a proxy acts for; `token_id`
    the token's `jti`; `key_id` the kid of the issuer key that verified the token."""

    tenant_id: UUID
    tenant: str
    subject: str
    role: Role
    issuer: str
    act_for: str | None = None
    token_id: str | None = None
    key_id: str | None = None
