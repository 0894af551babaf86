"""Who may do what: pure decisions, no I/O. Handlers never decide; use cases ask here."""

from __future__ import annotations

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
