"""Domain errors: what went wrong, in the domain's words. `api/problems.py` maps them to HTTP once.

Messages are fixed strings chosen here, never built from request content, so an error can be logged
or shown without leaking what a patient wrote.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Self
from uuid import UUID


class DomainError(Exception):
    """Base of every error the domain raises on purpose. `code` is stable and machine-readable."""

    code = "domain-error"
    title = "The request could not be completed"
    # Seconds after which the same request may well succeed (a refusal that passes: an outage, a limit);
    # None for one that will not change by waiting.
    retry_after: int | None = None

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        # The audit event of a refusal. It is recorded by whoever handles the error, after the refused
        # work's transaction has ended: recording it from inside would take a second connection while
        # the first is held, and enough refusals at once would leave the pool waiting on itself.
        self.audit: object | None = None

    def recording(self, event: object) -> Self:
        """This error, carrying the audit event that records the refusal."""
        self.audit = event
        return self


class NotFoundError(DomainError):
    """Absent, or present but not the caller's to see: both look the same from outside."""

    code = "not-found"
    title = "Not found"


class AuthenticationError(DomainError):
    """The caller could not be authenticated. `reason` is a fixed code kept for the audit log."""

    code = "unauthenticated"
    title = "Authentication required"

    def __init__(
        self,
        reason: str,
        detail: str | None = None,
        *,
        tenant_id: UUID | None = None,
        issuer: str | None = None,
        key_id: str | None = None,
    ) -> None:
        super().__init__(detail or "The bearer token is missing or not acceptable")
        self.reason = reason
        # Known only once the token's tenant and issuer were found: then the denial is that tenant's event.
        self.tenant_id = tenant_id
        self.issuer = issuer
        # Known only when a key of the issuer verified the token's signature (and something else was wrong:
        # it expired, its claims, its key was revoked): the denial names that key, as a success would.
        self.key_id = key_id


class WebhookSignatureError(AuthenticationError):
    """A signed webhook whose signature is missing, wrong or stale (no bearer token is involved)."""

    code = "webhook-signature-invalid"
    title = "Webhook signature not acceptable"


class AuthenticationThrottledError(DomainError):
    """This source failed authentication more often than its budget allows: the failure is counted for an
    audit summary rather than audited on its own (429). Not an `AuthenticationError`: it is no new denial."""

    code = "authentication-throttled"
    title = "Too many failed authentications"

    def __init__(self, retry_after: int) -> None:
        super().__init__("Too many requests from this address failed authentication; retry after Retry-After seconds")
        self.retry_after = retry_after  # when the source's budget (and the process's) has room again
        # The refusal this answers instead of (its 401, or a signed reply's 400): its challenge goes with it.
        self.refused: DomainError | None = None

    def instead_of(self, refused: DomainError) -> Self:
        """This error, answering for `refused`: a caller whose bearer token was refused still learns that
        another token might be accepted (the 401's challenge, RFC 9110 section 11.6.1)."""
        self.refused = refused
        return self


class ForbiddenError(DomainError):
    code = "forbidden"
    title = "Not allowed"


class ConsentRequiredError(ForbiddenError):
    """The patient's consent is not in force for this movement of data (403, `consent-required`)."""

    code = "consent-required"
    title = "The patient's consent is required"


class IssuerRolesNotAllowedError(ForbiddenError):
    """Roles an issuer may not be given this way: beyond what the operator lets a tenant admin register
    (`BEDSIDE_ADMIN_ISSUER_ROLES`), or for an issuer that exists (its roles are the operator's to change)."""

    code = "issuer-roles-not-allowed"
    title = "These roles may not be given to this issuer"


class EndorsementRequiredError(ForbiddenError):
    """A key for an existing issuer, sent without an endorsement by one of its active keys (or to an issuer
    that has no active key left, which only the operator may give a key again)."""

    code = "endorsement-required"
    title = "An endorsement by an active key of the issuer is required"


class EndorsementInvalidError(ForbiddenError):
    """An endorsement that does not prove an active key of the issuer vouches for this key, now.
    `reason` is a fixed code for the audit log, never told the caller."""

    code = "endorsement-invalid"
    title = "The endorsement is not acceptable"

    def __init__(self, reason: str) -> None:
        super().__init__(
            "The endorsement must be a JWS signed by an active key of the issuer (header kid), with claims iss, "
            "tid, aud, purpose, key, iat and exp as documented, and a lifetime of at most 10 minutes"
        )
        self.reason = reason


class ConflictError(DomainError):
    code = "conflict"
    title = "Conflict with the current state"


class RevokedKeyError(ConflictError):
    """An issuer key that was revoked: it is never trusted again, under any kid or issuer of the tenant."""

    code = "key-revoked"
    title = "This key was revoked"


class KeyInUseError(ConflictError):
    """An issuer key already trusted under another name (kid or issuer) of the tenant: a key has one name at
    a time, so that revoking it by that name stops it."""

    code = "key-in-use"
    title = "This key is already trusted under another kid or issuer"


class AlreadyExistsError(ConflictError):
    code = "already-exists"
    title = "Already exists"


@dataclass(frozen=True, slots=True)
class FieldProblem:
    """One failing field: where it is, the kind of failure, and a message. Never the submitted value."""

    loc: tuple[str | int, ...]
    type: str
    msg: str


class InvalidRequestError(DomainError):
    """The request's content is well-formed but not acceptable (unknown field, wrong type, bad value)."""

    code = "validation-failed"
    title = "The request is not valid"

    def __init__(self, problems: Sequence[FieldProblem], detail: str | None = None) -> None:
        super().__init__(detail or "One or more fields are not valid")
        self.problems = tuple(problems)


class MalformedRequestError(DomainError):
    """The request body could not be parsed at all."""

    code = "malformed-request"
    title = "The request body is not well-formed"


class UnsupportedMediaTypeError(DomainError):
    code = "unsupported-media-type"
    title = "Unsupported media type"


class PayloadTooLargeError(DomainError):
    code = "payload-too-large"
    title = "The request body is too large"


class TooManyUploadsError(DomainError):
    """The caller already has as many uploads in progress as one caller may have: one must end first."""

    code = "too-many-uploads"
    title = "Too many uploads in progress"
    retry_after = 5


class UploadTimeoutError(DomainError):
    """The upload's body did not arrive in time: past its deadline, or nothing of it came for too long.
    `reason` (`deadline`, `idle`) is a fixed code and `received` a count of bytes, kept for the log."""

    code = "upload-timeout"
    title = "The upload took too long"

    def __init__(self, reason: str, detail: str, *, received: int = 0) -> None:
        super().__init__(detail)
        self.reason = reason
        self.received = received


class UnavailableError(DomainError):
    """A dependency (the database) cannot be reached; fail closed rather than guess."""

    code = "unavailable"
    title = "Temporarily unavailable"
    retry_after = 5


class AuditUnavailableError(UnavailableError):
    """The audit event could not be written, so the work it records was not done (fail closed)."""

    code = "audit-unavailable"
    title = "The audit log cannot be written; nothing was done"


class ConfigurationError(Exception):
    """Bedside cannot start as configured (wrong database role, unknown schema, bad key file)."""


class RecalledError(DomainError):
    """The content was withdrawn with a recalled message (an attachment of recalled messages only)."""

    code = "content-recalled"
    title = "This content was recalled"

    def __init__(self, recalled_at: datetime) -> None:
        super().__init__("The message this content was sent with was recalled by its sender")
        self.recalled_at = recalled_at


class ShreddedError(DomainError):
    """The content was crypto-shredded: its key is destroyed and it can never be read again."""

    code = "content-shredded"
    title = "This content was destroyed"

    def __init__(self, shredded_at: datetime) -> None:
        super().__init__("The patient's data key was destroyed; this content can no longer be read")
        self.shredded_at = shredded_at
