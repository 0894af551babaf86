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
