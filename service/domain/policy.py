"""Who may do what: pure decisions, no I/O. Handlers never decide; use cases ask here."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from service.domain.principal import Principal, Role


def can_manage_issuers(principal: Principal) -> bool:
    """Only a tenant admin registers or lists the token issuers its tenant trusts."""
    return principal.role is Role.ADMIN


def can_manage_keys(principal: Principal) -> bool:
    """Key status, rewrap and crypto-shredding of a tenant's patients: its admin only."""
    return principal.role is Role.ADMIN


def can_query_audit(principal: Principal) -> bool:
    """The audit log is for compliance officers, and only their own tenant's part of it."""
    return principal.role is Role.COMPLIANCE


RECORDERS_WITH_EVIDENCE = frozenset({Role.STAFF, Role.PHYSICIAN})
WITNESSED_METHODS = frozenset({"paper", "verbal"})


def can_record_consent(principal: Principal, patient: str, evidence_method: str) -> bool:
    """A patient records their own consent; staff or a physician only on paper or verbally witnessed."""
    if principal.role is Role.PATIENT:
        return principal.subject == patient
    return principal.role in RECORDERS_WITH_EVIDENCE and evidence_method in WITNESSED_METHODS


def can_revoke_consent(principal: Principal, patient: str, scope: str, evidence_method: str | None) -> bool:
    """The patient; their proxy, for messaging only (the proxy consent itself is checked by the ledger);
    staff with witnessed evidence."""
    if principal.role is Role.PATIENT:
        return principal.subject == patient
    if principal.role is Role.PROXY:
        return principal.act_for == patient and scope == "messaging"
    return principal.role is Role.STAFF and evidence_method in WITNESSED_METHODS


def can_read_consents(principal: Principal, patient: str) -> bool:
    """Patients their own; compliance officers any patient of their tenant."""
    if principal.role is Role.PATIENT:
        return principal.subject == patient
    return principal.role is Role.COMPLIANCE


class Access(StrEnum):
    NONE = "none"
    READ = "read"  # break-glass: reading, for a limited time, nothing more
    WRITE = "write"  # read, send, mark read, close


@dataclass(frozen=True, slots=True)
class ThreadFacts:
    """What policy needs to know of a thread."""

    patient: str
    participants: frozenset[str]
    sensitive: bool


@dataclass(frozen=True, slots=True)
class Standing:
    """What the caller is to the thread's patient, as the domain looked it up."""

    teams: frozenset[str] = frozenset()  # care teams the caller is a current member of
    proxy_permit: bool = False  # a proxy consent of the patient to the caller is in force
    proxy_sensitive: bool = False  # ... and includes sensitive threads
    break_glass: bool = False  # a break-glass grant of the caller on this thread is open


def thread_access(principal: Principal, thread: ThreadFacts, standing: Standing) -> Access:
    """Patients: their own threads. Proxies: the patient's, within a proxy consent, sensitive ones only if
    included. Physicians: threads they take part in directly or through a care team, or read-only under
    break-glass. Staff: their care teams' threads. Compliance and admin: no content at all."""
    role = principal.role
    if role is Role.PATIENT:
        return Access.WRITE if principal.subject == thread.patient else Access.NONE
    if role is Role.PROXY:
        allowed = principal.act_for == thread.patient and standing.proxy_permit
        return Access.WRITE if allowed and (standing.proxy_sensitive or not thread.sensitive) else Access.NONE
    if role is Role.PHYSICIAN:
        if principal.subject in thread.participants or standing.teams & thread.participants:
            return Access.WRITE
        return Access.READ if standing.break_glass else Access.NONE
    if role is Role.STAFF:
        return Access.WRITE if standing.teams & thread.participants else Access.NONE
    return Access.NONE


def can_start_thread(
    principal: Principal, patient: str, participants: frozenset[str], standing: Standing, *, sensitive: bool = False
) -> bool:
    """The patient or their proxy with anyone (a proxy starts a sensitive thread only if their consent
    includes sensitive threads); a physician or staff member only in a thread they are part of."""
    if principal.role in (Role.PATIENT, Role.PROXY):
        facts = ThreadFacts(patient, participants, sensitive=sensitive)
        return thread_access(principal, facts, standing) is Access.WRITE
    if principal.role is Role.PHYSICIAN:
        return principal.subject in participants or bool(standing.teams & participants)
    if principal.role is Role.STAFF:
        return bool(standing.teams & participants)
    return False


def can_break_glass(principal: Principal) -> bool:
    """Only a physician may open a thread they are not part of, and only to read it."""
    return principal.role is Role.PHYSICIAN


def can_review_break_glass(principal: Principal) -> bool:
    return principal.role is Role.COMPLIANCE


def can_manage_care_teams(principal: Principal) -> bool:
    return principal.role is Role.ADMIN


def can_manage_webhooks(principal: Principal) -> bool:
    """Webhook endpoints, their secrets and deliveries: the tenant's admins."""
    return principal.role is Role.ADMIN
