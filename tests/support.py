"""Helpers the tests share: token issuers with real keys, canaries, and every audit event as the owner
sees it."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

AUDIENCE = "bedside"

# The columns an audit event has before and after the sequencer integrates it.
_EVENT_COLUMNS = (
    "event_id, occurred_at, tenant_id, action, outcome, actor, actor_role, issuer, act_for, patient, "
    "resource_type, resource_id, purpose, request_id, source, details, entry"
)
# Every audit event, whether it still waits in the outbox or is integrated: a test does not wait for the
# sequencer. `details` comes back as JSON text.
AUDIT_EVENTS = (
    f"(SELECT {_EVENT_COLUMNS} FROM audit_outbox UNION ALL SELECT {_EVENT_COLUMNS} FROM audit_leaves) AS events"  # noqa: S608
)


async def as_owner(owner_dsn: str, work: Callable[[asyncpg.Connection], Awaitable[Any]]) -> Any:
    """`work` on a connection of the owner role (no row-level security), closed afterwards."""
    conn = await asyncpg.connect(owner_dsn)
    try:
        return await work(conn)
    finally:
        await conn.close()


async def audit_events(owner_dsn: str, where: str, *args: object) -> list[asyncpg.Record]:
    """The audit events that match the SQL condition `where` (on `AUDIT_EVENTS`' columns, with `$n`
    arguments), oldest first, read on a connection of the owner role (no row-level security)."""
    owner = await asyncpg.connect(owner_dsn)
    try:
        return await owner.fetch(f"SELECT * FROM {AUDIT_EVENTS} WHERE {where} ORDER BY occurred_at", *args)  # noqa: S608
    finally:
        await owner.close()


def canary(label: str = "canary") -> str:
    """A unique string that must never show up where patient content does not belong."""
    return f"CANARY-{label}-{uuid.uuid4().hex}"


@dataclass
class TestIssuer:
    """An EHR portal's token issuer with a real key pair, as the portal would hold it."""

    __test__ = False

    tenant: str
    issuer: str
    algorithm: str = "EdDSA"
    kid: str = "portal-key-1"
    private_key: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.private_key is None:
            self.private_key = {
                "EdDSA": lambda: ed25519.Ed25519PrivateKey.generate(),
                "ES256": lambda: ec.generate_private_key(ec.SECP256R1()),
                "RS256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
            }[self.algorithm]()

    @property
    def public_pem(self) -> bytes:
        return bytes(
            self.private_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def claims(self, *, role: str = "patient", sub: str = "Patient/1", **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": sub,
            "aud": AUDIENCE,
            "iat": now,
            "exp": now + 300,
            "tid": self.tenant,
            "role": role,
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def token(
        self, *, role: str = "patient", sub: str = "Patient/1", headers: dict[str, Any] | None = None, **overrides: Any
    ) -> str:
        return jwt.encode(
            self.claims(role=role, sub=sub, **overrides),
            self.private_key,
            algorithm=self.algorithm,
            headers={"kid": self.kid, **(headers or {})},
        )

    def auth(self, **kwargs: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(**kwargs)}"}
