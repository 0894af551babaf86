"""JWT issuers a tenant trusts, the roles each may authenticate, and their public keys. Tenant-owned
(row-level security)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from uuid import UUID

import asyncpg

from service.store.db import Tx


@dataclass(frozen=True, slots=True)
class IssuerKeyRecord:
    """One key of an issuer, with its issuer's roles and who registered the issuer ("operator", "admin")."""

    issuer: str
    kid: str
    algorithm: str
    public_key_pem: str
    roles: tuple[str, ...]
    registered_by: str
    revoked_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class IssuerRecord:
    """An issuer of a tenant: the roles its tokens may claim, who registered it, and every key of it
    (revoked ones included, with their `revoked_at`), oldest first."""

    id: UUID
    issuer: str
    roles: tuple[str, ...]
    registered_by: str
    keys: tuple[IssuerKeyRecord, ...]


@dataclass(frozen=True, slots=True)
class RevokedKeyRecord:
    key: IssuerKeyRecord
    revoked_at: datetime
    newly_revoked: bool  # False: it already was
    # The same public key's other names (issuer, kid) in the tenant that this revocation revoked too: none
    # once migration 0016 holds (a key has one active name), some in a database from before it.
    also_revoked: tuple[tuple[str, str], ...] = ()


# Migration 0016's unique index: a public key is trusted under one name (issuer, kid) of its tenant at a time.
ONE_NAME_PER_KEY = "issuer_keys_one_name_per_key"


class IssuerStore:
    # No DO UPDATE (who registered an issuer never changes): None when the issuer exists already, which a
    # concurrent registration may have just committed.
    _CREATE_ISSUER = """
        INSERT INTO issuers (tenant_id, issuer, roles, registered_by) VALUES ($1, $2, $3, $4)
        ON CONFLICT (tenant_id, issuer) DO NOTHING
        RETURNING id
    """
    _INSERT_KEY = """
        INSERT INTO issuer_keys (tenant_id, issuer_id, kid, algorithm, public_key_pem)
        VALUES ($1, $2, $3, $4, $5)
        ON CONFLICT (issuer_id, kid) DO NOTHING
        RETURNING id
    """
    _KEY_BY_KID = """
        SELECT k.public_key_pem, k.revoked_at FROM issuer_keys k
        WHERE k.tenant_id = $1 AND k.issuer_id = $2 AND k.kid = $3
    """
    # The names (issuer, kid) the same key material is trusted under in the tenant: at most one since
    # migration 0016. Stored PEMs are canonical (SubjectPublicKeyInfo, as `load_issuer_public_key` makes
    # them; migration 0017's check holds every trusted key to it), so equal text is the same key; the
    # database compares fingerprints (0016's index).
    _ACTIVE_NAMES = """
        SELECT i.issuer, k.kid FROM issuer_keys k JOIN issuers i ON i.tenant_id = k.tenant_id AND i.id = k.issuer_id
        WHERE k.tenant_id = $1 AND k.public_key_pem = $2 AND k.revoked_at IS NULL
        ORDER BY k.created_at
    """
    # Every revoked key of the tenant, as stored: a revoked row may hold a key in another encoding than the
    # canonical one (written by the service's login, not the service, and revoked as migration 0017 asks), so
    # the domain compares keys, not text.
    _REVOKED_PEMS = "SELECT public_key_pem FROM issuer_keys WHERE tenant_id = $1 AND revoked_at IS NOT NULL"
    # The issuer and its keys in one round trip (what the authenticator asks on a cache miss). Active and
    # revoked keys alike: the authenticator names a token of a revoked key as such. An issuer without keys
    # is one row of NULL key columns.
    _ISSUER_WITH_KEYS = """
        SELECT i.id, i.issuer, i.roles, i.registered_by, k.kid, k.algorithm, k.public_key_pem, k.revoked_at
        FROM issuers i LEFT JOIN issuer_keys k ON k.tenant_id = i.tenant_id AND k.issuer_id = i.id
        WHERE i.tenant_id = $1 AND i.issuer = $2
        ORDER BY k.created_at
    """
    _ISSUER = "SELECT id, issuer, roles, registered_by FROM issuers WHERE tenant_id = $1 AND issuer = $2"
    # Locked, so that the roles read stay the roles changed (`bedside issuer roles` decides on them).
    _ISSUER_FOR_UPDATE = _ISSUER + " FOR UPDATE"
    _KEYS = """
        SELECT kid, algorithm, public_key_pem, revoked_at FROM issuer_keys
        WHERE tenant_id = $1 AND issuer_id = $2
        ORDER BY created_at
    """
    # Locked against revocation until the transaction ends: a key that endorses another is not revoked
    # half-way (a revocation that came first is seen here; one that comes later waits for the addition).
    _KEYS_LOCKED = """
        SELECT kid, algorithm, public_key_pem, revoked_at FROM issuer_keys
        WHERE tenant_id = $1 AND issuer_id = $2
        ORDER BY created_at
        FOR SHARE
    """
    # Locked, so that of two concurrent revocations the second waits and then finds the key revoked.
    _KEY_FOR_UPDATE = """
        SELECT k.id, i.issuer, i.roles, i.registered_by, k.kid, k.algorithm, k.public_key_pem, k.revoked_at
        FROM issuers i JOIN issuer_keys k ON k.tenant_id = i.tenant_id AND k.issuer_id = i.id
        WHERE i.tenant_id = $1 AND i.issuer = $2 AND k.kid = $3
        FOR UPDATE OF k
    """
    # A key is revoked under every name it has in the tenant: revoking it by one kid must not leave it trusted
    # under another (a database from before migration 0016 may hold one key under several).
    _REVOKE_EVERY_NAME = """
        WITH revoked AS (
            UPDATE issuer_keys SET revoked_at = now()
            WHERE tenant_id = $1 AND public_key_pem = $2 AND revoked_at IS NULL
            RETURNING id, issuer_id, kid, revoked_at, created_at
        )
        SELECT r.id, i.issuer, r.kid, r.revoked_at
        FROM revoked r JOIN issuers i ON i.tenant_id = $1 AND i.id = r.issuer_id
        ORDER BY r.created_at
    """
    _COUNT_ACTIVE = """
        SELECT count(*) FROM issuers i JOIN issuer_keys k ON k.tenant_id = i.tenant_id AND k.issuer_id = i.id
        WHERE i.tenant_id = $1 AND i.issuer = $2 AND k.revoked_at IS NULL
    """
    # Revoked keys too, with when: an operator sees what was revoked, not only what is left.
    _ALL_KEYS = """
        SELECT i.issuer, i.roles, i.registered_by, k.kid, k.algorithm, k.public_key_pem, k.revoked_at
        FROM issuers i JOIN issuer_keys k ON k.tenant_id = i.tenant_id AND k.issuer_id = i.id
        WHERE i.tenant_id = $1
        ORDER BY i.issuer, k.created_at
    """
    # The caller has read (and locked) the row and its roles before the change: `issuer(lock_roles=True)`.
    _SET_ROLES = "UPDATE issuers SET roles = $3 WHERE tenant_id = $1 AND issuer = $2"

    async def issuer(
        self, tx: Tx, tenant_id: UUID, issuer: str, *, lock_keys: bool = False, lock_roles: bool = False
    ) -> IssuerRecord | None:
        """The issuer of that name and all its keys; None if the tenant has no such issuer. `lock_keys`:
        its keys stay as read (none is revoked) until the transaction ends; `lock_roles`: its roles do."""
        if lock_keys or lock_roles:
            row = await tx.conn.fetchrow(self._ISSUER_FOR_UPDATE if lock_roles else self._ISSUER, tenant_id, issuer)
            if row is None:
                return None
            keys = await tx.conn.fetch(self._KEYS_LOCKED if lock_keys else self._KEYS, tenant_id, row["id"])
            return _issuer(row, [_key(k, row) for k in keys])
        rows = await tx.conn.fetch(self._ISSUER_WITH_KEYS, tenant_id, issuer)
        if not rows:
            return None
        return _issuer(rows[0], [_key(r, r) for r in rows if r["kid"] is not None])

    async def revoked_pems(self, tx: Tx, tenant_id: UUID) -> list[str]:
        """The PEM of every key revoked anywhere in the tenant (under any issuer or kid), as stored."""
        return [row["public_key_pem"] for row in await tx.conn.fetch(self._REVOKED_PEMS, tenant_id)]

    async def create_issuer(
        self, tx: Tx, tenant_id: UUID, issuer: str, roles: tuple[str, ...], registered_by: str
    ) -> UUID | None:
        """Register a new issuer; None if it exists already (and then nothing changed)."""
        created: UUID | None = await tx.conn.fetchval(
            self._CREATE_ISSUER, tenant_id, issuer, list(roles), registered_by
        )
        return created

    async def add_key(
        self, tx: Tx, tenant_id: UUID, issuer_id: UUID, kid: str, algorithm: str, public_key_pem: str
    ) -> str:
        """Add a key to the issuer. Returns "added", "unchanged" (same kid, same key), "conflict" (the kid is
        taken by another key), "in-use" (this key is trusted under another name in the tenant) or "revoked"
        (this key was revoked in the tenant, or this kid in the issuer).
        Anything but "added" and "unchanged" must roll the transaction back: after "revoked" it may be
        aborted (migration 0013's trigger refused the row)."""
        try:
            inserted = await tx.conn.fetchval(self._INSERT_KEY, tenant_id, issuer_id, kid, algorithm, public_key_pem)
        except asyncpg.exceptions.CheckViolationError as exc:
            if exc.constraint_name is not None:
                raise  # a column's own CHECK: the domain validates before, so a bug of ours
            return "revoked"  # migration 0013's trigger: this key was revoked since the domain checked
        except asyncpg.exceptions.UniqueViolationError as exc:
            if exc.constraint_name != ONE_NAME_PER_KEY:
                raise
            return "in-use"  # migration 0016's index: a registration under another name committed meanwhile
        if inserted:
            return "added"
        existing = await tx.conn.fetchrow(self._KEY_BY_KID, tenant_id, issuer_id, kid)
        if existing is not None and existing["revoked_at"] is not None:
            return "revoked"
        return "unchanged" if existing is not None and existing["public_key_pem"] == public_key_pem else "conflict"

    async def set_roles(self, tx: Tx, tenant_id: UUID, issuer: str, roles: tuple[str, ...]) -> None:
        """Set the roles of an issuer the caller has read with `lock_roles` (so it exists, and its roles
        before are the ones read)."""
        await tx.conn.execute(self._SET_ROLES, tenant_id, issuer, list(roles))

    async def active_names(self, tx: Tx, tenant_id: UUID, public_key_pem: str) -> list[tuple[str, str]]:
        """The names (issuer, kid) this public key is trusted under in the tenant, oldest first."""
        rows = await tx.conn.fetch(self._ACTIVE_NAMES, tenant_id, public_key_pem)
        return [(row["issuer"], row["kid"]) for row in rows]

    async def revoke_key(self, tx: Tx, tenant_id: UUID, issuer: str, kid: str) -> RevokedKeyRecord | None:
        """Revoke the key `kid` of `issuer`, and the same public key under every other name it is trusted
        under in the tenant (a revoked one stays as it is); None if the issuer has no such key."""
        row = await tx.conn.fetchrow(self._KEY_FOR_UPDATE, tenant_id, issuer, kid)
        if row is None:
            return None
        revoked = await tx.conn.fetch(self._REVOKE_EVERY_NAME, tenant_id, row["public_key_pem"])
        others = tuple((r["issuer"], r["kid"]) for r in revoked if r["id"] != row["id"])
        if row["revoked_at"] is not None:
            return RevokedKeyRecord(_key(row, row), row["revoked_at"], newly_revoked=False, also_revoked=others)
        (revoked_at,) = [r["revoked_at"] for r in revoked if r["id"] == row["id"]]
        key = replace(_key(row, row), revoked_at=revoked_at)
        return RevokedKeyRecord(key, revoked_at, newly_revoked=True, also_revoked=others)

    async def count_active(self, tx: Tx, tenant_id: UUID, issuer: str) -> int:
        return int(await tx.conn.fetchval(self._COUNT_ACTIVE, tenant_id, issuer))

    async def all_keys(self, tx: Tx, tenant_id: UUID) -> list[IssuerKeyRecord]:
        """Every key of every issuer of the tenant, revoked ones included (with their `revoked_at`)."""
        return [_key(r, r) for r in await tx.conn.fetch(self._ALL_KEYS, tenant_id)]


def _key(row: asyncpg.Record, issuer: asyncpg.Record) -> IssuerKeyRecord:
    """A key from `row`, with the issuer's name, roles and registrant from `issuer` (often the same row)."""
    return IssuerKeyRecord(
        issuer=issuer["issuer"],
        kid=row["kid"],
        algorithm=row["algorithm"],
        public_key_pem=row["public_key_pem"],
        roles=tuple(issuer["roles"]),
        registered_by=issuer["registered_by"],
        revoked_at=row["revoked_at"],
    )


def _issuer(row: asyncpg.Record, keys: list[IssuerKeyRecord]) -> IssuerRecord:
    return IssuerRecord(
        id=row["id"],
        issuer=row["issuer"],
        roles=tuple(row["roles"]),
        registered_by=row["registered_by"],
        keys=tuple(keys),
    )
