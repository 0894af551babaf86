"""The JWT issuers each tenant trusts (its EHR portal), the roles each may authenticate, their keys, and
the development issuer.

Keys and roles are looked up per (tenant, issuer) on every request, so they are cached for a short,
configured time; a negative answer is cached too, so a flood of tokens from unknown issuers cannot reach
the database for each one. Adding or revoking a key, or changing an issuer's roles, clears the entry of its
(tenant, issuer) in this process at once; other processes see the change when their entry expires, at most
`cache_seconds` later.

The operator registers issuers and keys as they like. A tenant admin adds a key to an existing issuer only
with an endorsement, a JWS one of the issuer's active keys signed over the new key's fingerprint (the portal
rotating its own key), and registers new issuers only with the roles the operator lets admins give: an
admin cannot sign tokens under the portal's name, nor give themselves roles the operator kept back; nor
can the operator be led into giving them (`set_roles` keeps an admin's issuer within those roles unless told
otherwise). A key has one name (issuer, kid) in its tenant at a time, and revoking it revokes it under every
name, so a revoked key signs nothing. Names under `urn:bedside:` are the service's own.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from uuid import UUID

import jwt

from crypto.issuer_keys import IssuerKeyError, IssuerKeyPair, IssuerPublicKey, load_issuer_public_key
from service.domain.audit import AuditAction, AuditEvent, AuditRecorder, DetailValue
from service.domain.policy import can_manage_issuers
from service.domain.principal import ALL_ROLES, Principal, Role, is_plain_text, role_names
from service.domain.tokens import SignatureChecker, TokenRefusedError, unverified_parts
from service.errors import (
    ConflictError,
    DomainError,
    EndorsementInvalidError,
    EndorsementRequiredError,
    FieldProblem,
    InvalidRequestError,
    IssuerRolesNotAllowedError,
    KeyInUseError,
    NotFoundError,
    RevokedKeyError,
)
from service.logs import get_logger
from service.store.db import Database, Tx
from service.store.issuers import IssuerKeyRecord, IssuerRecord, IssuerStore
from service.store.tenants import TenantStore

# Issuer names the service gives itself: the development issuer, and `urn:bedside:webhook:<endpoint id>`, the
# issuer of an inbound webhook reply's principal (domain/inbound.py). Nobody registers one: else a token of
# theirs would carry, in every audit event, an issuer the log's reader takes for the service's own.
RESERVED_ISSUER_PREFIX = "urn:bedside:"
DEV_ISSUER = RESERVED_ISSUER_PREFIX + "dev-issuer"

# An endorsement: a JWS an active key of the issuer signs over the fingerprint of the key to add. Its
# `purpose` keeps it apart from a login token both ways (the authenticator refuses a token with a `purpose`;
# a login token has none, nor a `key`), and it is short-lived: it vouches for one key, now.
ENDORSEMENT_PURPOSE = "issuer-key-endorsement"
ENDORSEMENT_MAX_LIFETIME_SECONDS = 600
_ENDORSEMENT_CLAIMS = ("iss", "aud", "exp", "iat", "tid", "purpose", "key")

log = get_logger("bedside.issuers")


@dataclass(frozen=True, slots=True)
class TrustedKeys:
    """What the authenticator needs to check a token of (tenant, issuer): None tenant means unknown.
    `keys` are the active keys; `revoked` the revoked ones, only so that a token one of them signed is
    refused, and audited, as what it is; `roles` the roles the issuer's tokens may claim."""

    tenant_id: UUID | None
    keys: tuple[IssuerKeyRecord, ...]
    revoked: tuple[IssuerKeyRecord, ...] = ()
    roles: frozenset[Role] = ALL_ROLES

    def trusts(self, kid: str | None) -> bool:
        """Whether the key `kid` is still one of the active keys (a kid names one key of an issuer for
        good: the store never lets another key take a kid, revoked or not)."""
        return any(key.kid == kid for key in self.keys)


@dataclass(frozen=True, slots=True)
class Revocation:
    """A revoked issuer key, when, whether this call revoked it (False: it already was), how many keys of
    its issuer are still trusted (0: the issuer authenticates nobody now), and the other names (issuer, kid)
    the same public key was trusted under and that this call revoked too."""

    key: IssuerKeyRecord
    revoked_at: datetime
    newly_revoked: bool
    active_keys: int
    also_revoked: tuple[tuple[str, str], ...] = ()  # (issuer, kid): the same key's other names, revoked too


@dataclass(frozen=True, slots=True)
class RolesChange:
    """An issuer's roles before and after `bedside issuer roles`."""

    issuer: str
    old: tuple[str, ...]
    new: tuple[str, ...]


class IssuerService:
    def __init__(
        self,
        db: Database,
        tenants: TenantStore,
        issuers: IssuerStore,
        audit: AuditRecorder,
        *,
        cache_seconds: float = 30.0,
        cache_entries: int = 1024,
        clock: Callable[[], float] = time.monotonic,
        audience: str = "bedside",
        leeway_seconds: int = 60,
        admin_roles: frozenset[Role] = frozenset(),
    ) -> None:
        self._db = db
        self._tenants = tenants
        self._issuers = issuers
        self._audit = audit
        self._ttl = cache_seconds
        self._max = cache_entries
        self._clock = clock
        self._cache: OrderedDict[tuple[str, str], tuple[float, TrustedKeys]] = OrderedDict()
        # Bumped whenever this process changes a key: a lookup that read the database before the change
        # and finishes after it must not put what it read into the cache.
        self._generation = 0
        # Endorsements are checked as bearer tokens are: the same audience, skew and algorithms.
        self._signatures = SignatureChecker(audience=audience, leeway_seconds=leeway_seconds)
        self._admin_roles = admin_roles

    @property
    def signatures(self) -> SignatureChecker:
        """The checker of this deployment's tokens (audience, skew, parsed keys), shared with `Authenticator`."""
        return self._signatures

    async def add_key(
        self,
        tenant: str,
        issuer: str,
        public_key_pem: bytes,
        kid: str | None = None,
        *,
        roles: frozenset[Role] | None = None,
    ) -> IssuerKeyRecord:
        """The operator (`bedside issuer add`) trusts `issuer` in `tenant` (slug) with this public key; the
        key is returned with its kid (its fingerprint unless given). A new issuer gets `roles` (default: all);
        an existing one keeps its own, and other `roles` for it are refused (`set_roles` changes them).
        Adding the same key again (same kid) changes nothing; another key under a used kid is refused, and so
        are a key trusted under another kid or issuer of the tenant (a key has one name at a time) and a key
        that was revoked (under any kid or issuer of the tenant); those attempts are audited."""
        if roles is not None and not roles:
            raise InvalidRequestError([FieldProblem(("roles",), "value", "at least one role")])
        key, kid = _checked_key(issuer, public_key_pem, kid)
        return await self._add(await self._tenant_id(tenant), tenant, issuer, key, kid, roles, None, by=None)

    async def add_dev_key(self, tenant: str, public_key_pem: bytes) -> IssuerKeyRecord:
        """Embedded mode only: trust the development issuer (`DEV_ISSUER`, a name of the service's own that
        nobody else may register) in `tenant` (slug) with this key, under its fingerprint, with all six roles.
        As `add_key` otherwise: adding it again changes nothing, and a revoked key stays revoked."""
        key, kid = _checked_key(DEV_ISSUER, public_key_pem, None)
        tenant_id = await self._tenant_id(tenant)
        return await self._add(tenant_id, tenant, DEV_ISSUER, key, kid, None, None, by=None, own_name=True)

    async def _tenant_id(self, tenant: str) -> UUID:
        async with self._db.transaction() as tx:
            found = await self._tenants.by_slug(tx, tenant)
        if found is None:
            raise InvalidRequestError([FieldProblem(("tenant",), "unknown", "no such tenant")])
        return found.id

    async def add_key_as(
        self,
        principal: Principal,
        issuer: str,
        public_key_pem: bytes,
        kid: str | None = None,
        *,
        roles: frozenset[Role] | None = None,
        endorsement: str | None = None,
    ) -> IssuerKeyRecord:
        """An admin trusts a key in their own tenant. A new issuer is theirs to register, with `roles`
        (default: all the operator lets admins give) within what the operator allows; a key for an existing
        issuer needs an `endorsement` by one of its active keys, and leaves its roles as they are. Anyone
        else: not found."""
        if not can_manage_issuers(principal):
            raise NotFoundError()
        key, kid = _checked_key(issuer, public_key_pem, kid)
        return await self._add(
            principal.tenant_id, principal.tenant, issuer, key, kid, roles, endorsement, by=principal
        )

    async def _add(
        self,
        tenant_id: UUID,
        tenant: str,
        issuer: str,
        key: IssuerPublicKey,
        kid: str,
        roles: frozenset[Role] | None,
        endorsement: str | None,
        *,
        by: Principal | None,
        own_name: bool = False,
    ) -> IssuerKeyRecord:
        fields = {"resource_type": "Issuer", "resource_id": issuer[:200], "details": {"kid": kid[:200]}}
        attempt = AuditEvent.by_principal_or_operator(by, AuditAction.ISSUER_ADD, tenant_id, **fields)
        try:
            refusal = None if own_name else issuer_name_refusal(issuer)
            if refusal is not None:
                raise _refused_name(refusal).recording(attempt.denied(refusal))
            async with self._db.transaction(tenant_id) as tx:
                if any(_same_key(stored, key) for stored in await self._issuers.revoked_pems(tx, tenant_id)):
                    raise _revoked().recording(attempt.denied("key-revoked"))
                # One name per key: else revoking it by the kid a leak is known by leaves it trusted under
                # another (an endorsement replayed with another kid; the same PEM added twice).
                elsewhere = [
                    name for name in await self._issuers.active_names(tx, tenant_id, key.pem) if name != (issuer, kid)
                ]
                if elsewhere:
                    other_issuer, other_kid = elsewhere[0]
                    refused = _with(
                        attempt.denied("key-in-use"), active_issuer=other_issuer[:200], active_kid=other_kid[:200]
                    )
                    raise _in_use().recording(refused)
                found = await self._issuers.issuer(tx, tenant_id, issuer, lock_keys=True)
                created = False
                if found is None:
                    found, created = await self._create(tx, tenant_id, issuer, roles, attempt, by)
                event = attempt
                if created:
                    event = _with(attempt, new_issuer=True, roles=list(found.roles), registered_by=found.registered_by)
                else:
                    same_roles = roles is None or role_names(roles) == found.roles
                    if same_roles and _already_active(found, kid, key):
                        return _record(found, kid, key)  # a repeat of what is already so: nothing to check
                    if roles is not None and (by is not None or not same_roles):
                        refused = _with(attempt.denied("roles-of-existing-issuer"), roles=list(role_names(roles)))
                        raise _roles_of_existing(by, found).recording(refused)
                    if by is not None:
                        endorser = self._endorser(endorsement, tenant, found, key, attempt)
                        event = _with(attempt, endorsed_by=endorser[:200])
                outcome = await self._issuers.add_key(tx, tenant_id, found.id, kid, key.algorithm, key.pem)
                if outcome == "conflict":
                    raise ConflictError("this kid is already registered for another key of the issuer")
                if outcome == "revoked":
                    raise _revoked().recording(attempt.denied("key-revoked"))
                if outcome == "in-use":
                    raise _in_use().recording(attempt.denied("key-in-use"))
                if outcome == "added":
                    await self._audit.record(tx, event)
        except DomainError as error:
            # An API caller's refusal is recorded by the API's error handling once the transaction has
            # ended (nothing of the attempt is written); the operator's is recorded here, after it too.
            if by is None and isinstance(error.audit, AuditEvent):
                await self._audit.record_alone(error.audit)
            raise
        self._forget(tenant, issuer)
        return _record(found, kid, key)

    async def _create(
        self,
        tx: Tx,
        tenant_id: UUID,
        issuer: str,
        roles: frozenset[Role] | None,
        attempt: AuditEvent,
        by: Principal | None,
    ) -> tuple[IssuerRecord, bool]:
        """Register a new issuer: the operator's with the roles asked (default all six), an admin's within
        `admin_roles` (default none: admins register no new issuers). Returns the issuer, and False when a
        registration that committed meanwhile made it first (then nothing changed: it is an existing issuer
        after all)."""
        allowed = ALL_ROLES if by is None else self._admin_roles
        wanted = allowed if roles is None else roles
        if not wanted or not wanted <= allowed:
            refused = _with(attempt.denied("roles-not-allowed"), roles=list(role_names(wanted)))
            detail = (
                "Tenant admins may register new issuers with these roles only: " + ", ".join(role_names(allowed))
                if allowed
                else "Tenant admins may not register new issuers: the operator does (bedside issuer add)"
            )
            raise IssuerRolesNotAllowedError(detail).recording(refused)
        names = role_names(wanted)
        created = await self._issuers.create_issuer(tx, tenant_id, issuer, names, "operator" if by is None else "admin")
        found = await self._issuers.issuer(tx, tenant_id, issuer, lock_keys=True)
        if found is None:  # created now, or by a registration that committed meanwhile: never seen
            raise ConflictError("the issuer changed while it was being registered: try again")
        return found, created is not None

    def _endorser(
        self, endorsement: str | None, tenant: str, found: IssuerRecord, key: IssuerPublicKey, attempt: AuditEvent
    ) -> str:
        """The kid of the active key of `found` whose endorsement vouches for `key`; else the refusal."""
        if not any(k.revoked_at is None for k in found.keys):
            # Else an admin could revoke every key of the portal's issuer, then give it one of their own.
            raise EndorsementRequiredError(
                "This issuer has no active key: only the operator can give it a key again (bedside issuer add)"
            ).recording(attempt.denied("no-active-key"))
        if endorsement is None:
            raise EndorsementRequiredError(
                "A key for an existing issuer needs an endorsement: a JWS signed by one of its active keys"
            ).recording(attempt.denied("endorsement-missing"))
        try:
            return self._check_endorsement(endorsement, tenant, found, key)
        except TokenRefusedError as refused:
            log.info("issuer.endorsement_refused", reason=refused.reason)
            denied = attempt.denied(f"endorsement-{refused.reason}")
            if refused.key_id is not None:  # the key that signed it: a revoked one's use shows
                denied = replace(denied, details={**denied.details, "endorsement_kid": refused.key_id[:200]})
            raise EndorsementInvalidError(refused.reason).recording(denied) from None

    def _check_endorsement(self, token: str, tenant: str, found: IssuerRecord, key: IssuerPublicKey) -> str:
        header, _ = unverified_parts(token)
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise TokenRefusedError("missing-kid")
        claims, signer = self._signatures.verify(
            token,
            issuer=found.issuer,
            algorithm=header["alg"],
            kid=kid,
            active=[k for k in found.keys if k.revoked_at is None],
            revoked=[k for k in found.keys if k.revoked_at is not None],
            required=_ENDORSEMENT_CLAIMS,
        )
        issued, expires = claims["iat"], claims["exp"]
        if not isinstance(issued, int | float) or not isinstance(expires, int | float):
            raise TokenRefusedError("invalid-claims", key_id=signer.kid)
        if expires - issued > ENDORSEMENT_MAX_LIFETIME_SECONDS:
            raise TokenRefusedError("lifetime-too-long", key_id=signer.kid)
        if claims["purpose"] != ENDORSEMENT_PURPOSE:
            raise TokenRefusedError("wrong-purpose", key_id=signer.kid)
        if claims["tid"] != tenant:
            raise TokenRefusedError("wrong-tenant", key_id=signer.kid)
        if claims["key"] != key.fingerprint:
            raise TokenRefusedError("wrong-key", key_id=signer.kid)
        return signer.kid

    async def set_roles(
        self, tenant: str, issuer: str, roles: frozenset[Role], *, trust_admin_registered: bool = False
    ) -> RolesChange:
        """The operator (`bedside issuer roles`) sets the roles an existing issuer's tokens may claim. Takes
        effect at once in this process, within the issuer-key cache's lifetime in the others. NotFoundError
        for an issuer the tenant does not have (nothing recorded: nothing was done).

        An issuer a tenant admin registered holds the admin's keys: roles it does not have yet and that
        `admin_roles` (BEDSIDE_ADMIN_ISSUER_ROLES) does not allow are refused (audited), unless
        `trust_admin_registered` says the operator trusts its keys with them (recorded in the event)."""
        if not roles:
            raise InvalidRequestError([FieldProblem(("roles",), "value", "at least one role")])
        if not is_plain_text(issuer, 300):
            raise InvalidRequestError([FieldProblem(("issuer",), "value", "1 to 300 printable characters")])
        tenant_id = await self._tenant_id(tenant)
        names = role_names(roles)
        fields = {"tenant_id": tenant_id, "resource_type": "Issuer", "resource_id": issuer[:200]}
        try:
            async with self._db.transaction(tenant_id) as tx:
                found = await self._issuers.issuer(tx, tenant_id, issuer, lock_roles=True)
                if found is None:
                    raise NotFoundError("this tenant has no such issuer")
                details: dict[str, DetailValue] = {"old_roles": list(found.roles), "new_roles": list(names)}
                if found.registered_by == "admin":
                    beyond = [r for r in names if r not in found.roles and Role(r) not in self._admin_roles]
                    details["registered_by"] = "admin"
                    if beyond and not trust_admin_registered:
                        refused = AuditEvent.by_operator(AuditAction.ISSUER_ROLES, **fields, details=details)
                        refused = _with(refused.denied("roles-beyond-admin-roles"), beyond_admin_roles=beyond)
                        raise _admins_issuer(found, self._admin_roles, beyond).recording(refused)
                    if beyond:
                        details["beyond_admin_roles"] = beyond
                    if trust_admin_registered:
                        details["trust_admin_registered"] = True
                await self._issuers.set_roles(tx, tenant_id, issuer, names)
                event = AuditEvent.by_operator(AuditAction.ISSUER_ROLES, **fields, details=details)
                await self._audit.record(tx, event)
        except DomainError as error:
            if isinstance(error.audit, AuditEvent):  # the operator's refusal, recorded once it has ended
                await self._audit.record_alone(error.audit)
            raise
        self._forget(tenant, issuer)
        return RolesChange(issuer, found.roles, names)

    async def revoke_key(self, tenant: str, issuer: str, kid: str) -> Revocation:
        """The operator (`bedside issuer revoke`) withdraws the key `kid` of `issuer` in `tenant` (slug).
        Revoking a revoked key changes nothing and answers the same; NotFoundError for no such key."""
        _check_names(issuer, kid)
        async with self._db.transaction() as tx:
            found = await self._tenants.by_slug(tx, tenant)
        if found is None:
            raise InvalidRequestError([FieldProblem(("tenant",), "unknown", "no such tenant")])
        return await self._revoke(found.id, tenant, issuer, kid, None)

    async def revoke_key_as(self, principal: Principal, issuer: str, kid: str) -> Revocation:
        """An admin withdraws a key of an issuer of their own tenant. Anyone else: not found. An unknown
        issuer or kid: not found, and the attempt is audited."""
        if not can_manage_issuers(principal):
            raise NotFoundError()
        _check_names(issuer, kid)
        return await self._revoke(principal.tenant_id, principal.tenant, issuer, kid, principal)

    async def _revoke(self, tenant_id: UUID, tenant: str, issuer: str, kid: str, by: Principal | None) -> Revocation:
        async with self._db.transaction(tenant_id) as tx:
            revoked = await self._issuers.revoke_key(tx, tenant_id, issuer, kid)
            if revoked is not None:
                active = await self._issuers.count_active(tx, tenant_id, issuer)
                details: dict[str, DetailValue] = {
                    "kid": kid,
                    "already_revoked": not revoked.newly_revoked,
                    "active_keys": active,
                }
                if revoked.also_revoked:  # the same key under other names (a database from before 0016)
                    details["also_revoked_issuers"] = [name[:200] for name, _ in revoked.also_revoked]
                    details["also_revoked_kids"] = [other[:200] for _, other in revoked.also_revoked]
                fields = {"resource_type": "Issuer", "resource_id": issuer[:200], "details": details}
                event = AuditEvent.by_principal_or_operator(by, AuditAction.ISSUER_REVOKE, tenant_id, **fields)
                await self._audit.record(tx, event)
        if revoked is None:
            missing = NotFoundError("this issuer has no key of this kid in the tenant")
            if by is None:
                raise missing
            raise missing.recording(
                AuditEvent.by(
                    by,
                    AuditAction.ACCESS_DENIED,
                    resource_type="Issuer",
                    resource_id=issuer[:200],
                    details={"attempt": "revoke", "kid": kid},
                ).denied("not-found")
            )
        # This process stops trusting the key now (the authenticator's verified tokens of it included:
        # it asks `trusted_keys` before reusing one); the others when their cache entry expires.
        for name in {issuer, *(other for other, _ in revoked.also_revoked)}:
            self._forget(tenant, name)
        return Revocation(revoked.key, revoked.revoked_at, revoked.newly_revoked, active, revoked.also_revoked)

    def _forget(self, tenant: str, issuer: str) -> None:
        """This process stops using what it cached of the issuer (its keys, its roles)."""
        self._generation += 1
        self._cache.pop((tenant, issuer), None)

    async def list_keys_as(self, principal: Principal) -> list[IssuerKeyRecord]:
        """An admin lists their tenant's issuer keys, revoked ones included (`revoked_at` set). Anyone
        else: not found."""
        if not can_manage_issuers(principal):
            raise NotFoundError()
        async with self._db.transaction(principal.tenant_id) as tx:
            keys = await self._issuers.all_keys(tx, principal.tenant_id)
            await self._audit.record(tx, AuditEvent.by(principal, AuditAction.ISSUER_LIST, resource_type="Issuer"))
        return keys

    async def trusted_keys(self, tenant: str, issuer: str) -> TrustedKeys:
        """The active keys of `issuer` in `tenant` (slug) and the roles its tokens may claim, from the cache
        when fresh."""
        now = self._clock()
        cached = self._cache.get((tenant, issuer))
        if cached is not None and cached[0] > now:
            self._cache.move_to_end((tenant, issuer))
            return cached[1]
        generation = self._generation
        async with self._db.transaction() as tx:
            found = await self._tenants.by_slug(tx, tenant)
        if found is None:
            trusted = TrustedKeys(tenant_id=None, keys=())
        else:
            async with self._db.transaction(found.id) as tx:
                known = await self._issuers.issuer(tx, found.id, issuer)
            keys = () if known is None else known.keys
            trusted = TrustedKeys(
                tenant_id=found.id,
                keys=tuple(k for k in keys if k.revoked_at is None),
                revoked=tuple(k for k in keys if k.revoked_at is not None),
                roles=ALL_ROLES if known is None else frozenset(Role(name) for name in known.roles),
            )
        if self._ttl > 0 and generation == self._generation:
            self._cache[(tenant, issuer)] = (now + self._ttl, trusted)
            while len(self._cache) > self._max:
                self._cache.popitem(last=False)
        return trusted

    async def list_keys(self, tenant: str) -> list[IssuerKeyRecord]:
        """The operator (`bedside issuer list`) lists a tenant's (slug) issuer keys, revoked ones included."""
        async with self._db.transaction() as tx:
            found = await self._tenants.by_slug(tx, tenant)
        if found is None:
            raise InvalidRequestError([FieldProblem(("tenant",), "unknown", "no such tenant")])
        async with self._db.transaction(found.id) as tx:
            return await self._issuers.all_keys(tx, found.id)


def _checked_key(issuer: str, public_key_pem: bytes, kid: str | None) -> tuple[IssuerPublicKey, str]:
    """The key in canonical form and its kid (its fingerprint unless given), or InvalidRequestError."""
    problems = _name_problems(issuer, kid)
    try:
        key = load_issuer_public_key(public_key_pem)
    except IssuerKeyError as exc:
        problems.append(FieldProblem(("public_key_pem",), "key", str(exc)))
    if problems:
        raise InvalidRequestError(problems)
    return key, kid or key.fingerprint


def is_reserved_issuer(issuer: str) -> bool:
    """Whether `issuer` is in the service's own namespace, `urn:bedside:`: in any case (a URN's scheme and
    namespace are case-insensitive, RFC 8141), blanks around ignored. Meant for ASCII names: a name with
    anything else in it is refused before it is asked (`issuer_name_refusal`)."""
    return issuer.strip().casefold().startswith(RESERVED_ISSUER_PREFIX)


def issuer_name_refusal(issuer: str) -> str | None:
    """Why a key may not be registered under `issuer` (the audit reason), or None if it may.

    Issuer names are printable ASCII (a URL or URN; an internationalized host in its `xn--` form): any
    other character could make a name read as another (a Cyrillic `е` for an `e`, an invisible filler, a
    full-width colon), and a reader of the audit log must see the issuer that signed. And names under
    `urn:bedside:` are the service's own."""
    if not issuer.isascii():
        return "issuer-name-not-ascii"
    if is_reserved_issuer(issuer):
        return "reserved-issuer-name"
    return None


def _refused_name(reason: str) -> InvalidRequestError:
    if reason == "reserved-issuer-name":
        problem = FieldProblem(("issuer",), "reserved", "names starting urn:bedside: are the service's own")
        return InvalidRequestError([problem], "This issuer name is reserved")
    problem = FieldProblem(("issuer",), "value", "printable ASCII: a URL or URN (an internationalized host as xn--)")
    return InvalidRequestError([problem], "An issuer name is printable ASCII")


def _same_key(stored_pem: str, key: IssuerPublicKey) -> bool:
    """Whether a stored PEM holds `key`: the same text, or another encoding of it (a row the service did not
    write: CRLF, PKCS#1, a compressed point), read as the loader reads every key it is given."""
    if stored_pem == key.pem:
        return True
    try:
        return load_issuer_public_key(stored_pem.encode()).pem == key.pem
    except IssuerKeyError:
        return False  # not a key the service would take: not this one


def _already_active(found: IssuerRecord, kid: str, key: IssuerPublicKey) -> bool:
    return any(k.kid == kid and k.public_key_pem == key.pem and k.revoked_at is None for k in found.keys)


def _record(found: IssuerRecord, kid: str, key: IssuerPublicKey) -> IssuerKeyRecord:
    return IssuerKeyRecord(
        issuer=found.issuer,
        kid=kid,
        algorithm=key.algorithm,
        public_key_pem=key.pem,
        roles=found.roles,
        registered_by=found.registered_by,
    )


def _with(event: AuditEvent, **details: DetailValue) -> AuditEvent:
    return replace(event, details={**event.details, **details})


def _revoked() -> RevokedKeyError:
    return RevokedKeyError("this key (or this kid) was revoked and is never trusted again: register a new key")


def _in_use() -> KeyInUseError:
    return KeyInUseError(
        "this key is already trusted under another kid or issuer of the tenant, and a key has one name at a time "
        "(so that revoking it by that name stops it): the issuer keys listing shows where"
    )


def _roles_of_existing(by: Principal | None, found: IssuerRecord) -> IssuerRolesNotAllowedError:
    if by is not None:
        return IssuerRolesNotAllowedError("An existing issuer's roles are the operator's to change: leave out `roles`")
    if found.registered_by == "admin":
        return IssuerRolesNotAllowedError(
            f"a tenant admin registered this issuer, with the roles {','.join(found.roles)}; {_keys_of(found)}. "
            "Every key of it, the admin's included, signs with the issuer's roles: revoke the keys you do not "
            "trust (`bedside issuer revoke`), add yours without --roles, and widen the roles only once you trust "
            "every key left (`bedside issuer roles ... --trust-admin-registered`)"
        )
    return IssuerRolesNotAllowedError(
        "the issuer exists with other roles: change an existing issuer's roles with `bedside issuer roles`"
    )


def _admins_issuer(found: IssuerRecord, allowed: frozenset[Role], beyond: list[str]) -> IssuerRolesNotAllowedError:
    cap = ",".join(role_names(allowed)) or "none"
    return IssuerRolesNotAllowedError(
        f"a tenant admin registered this issuer; {_keys_of(found)}. The roles {','.join(beyond)} are beyond "
        f"those admins may give (BEDSIDE_ADMIN_ISSUER_ROLES: {cap}) and would go to every key of it, the "
        "admin's included: revoke the keys you do not trust (`bedside issuer revoke`), then pass "
        "--trust-admin-registered to give them anyway"
    )


def _keys_of(found: IssuerRecord, shown: int = 10) -> str:
    """The issuer's keys for the operator's eyes: kids (identifiers, never content) and whether trusted."""
    if not found.keys:
        return "it has no key"
    listed = [f"{k.kid} ({'active' if k.revoked_at is None else 'revoked'})" for k in found.keys[:shown]]
    more = f" and {len(found.keys) - shown} more" if len(found.keys) > shown else ""
    return "its keys: " + ", ".join(listed) + more


def _name_problems(issuer: str, kid: str | None) -> list[FieldProblem]:
    problems = []
    if not is_plain_text(issuer, 300):
        problems.append(FieldProblem(("issuer",), "value", "1 to 300 printable characters"))
    if kid is not None and not is_plain_text(kid, 200):
        problems.append(FieldProblem(("kid",), "value", "1 to 200 printable characters"))
    return problems


def _check_names(issuer: str, kid: str) -> None:
    problems = _name_problems(issuer, kid)
    if problems:
        raise InvalidRequestError(problems)


def mint_token(
    key: IssuerKeyPair,
    *,
    issuer: str,
    audience: str,
    tenant: str,
    role: str,
    subject: str,
    act_for: str | None = None,
    lifetime_seconds: int = 900,
    kid: str | None = None,
    now: float | None = None,
) -> str:
    """Sign a token the way an EHR portal would (used by `bedside token` in embedded mode and by tests)."""
    issued = int(time.time() if now is None else now)
    claims: dict[str, object] = {
        "iss": issuer,
        "sub": subject,
        "aud": audience,
        "iat": issued,
        "nbf": issued,
        "exp": issued + lifetime_seconds,
        "tid": tenant,
        "role": role,
    }
    if act_for is not None:
        claims["act_for"] = act_for
    return jwt.encode(
        claims,
        key.private_pem,
        algorithm=key.public.algorithm,
        headers={"kid": kid or key.public.fingerprint},
    )
