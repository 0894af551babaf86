"""Verified tokens are reused until they expire, and only while the issuer-key cache still trusts the key
that verified them: a revoked key's tokens end with its keys, never later."""

from __future__ import annotations

import asyncio
import time

import pytest

from service.domain.audit import AuditRecorder
from service.domain.auth import Authenticator
from service.domain.issuers import IssuerService
from service.errors import AuthenticationError
from service.store.audit import AuditStore
from service.store.issuers import IssuerStore
from service.store.tenants import TenantStore
from tests.conftest import Dsns, Portals, Services
from tests.support import as_owner


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _process(services: Services, clock: Clock, cache_seconds: float = 30) -> tuple[IssuerService, Authenticator]:
    """The issuer service and authenticator of one server process, with both caches on and one clock."""
    issuers = IssuerService(
        services.db,
        TenantStore(),
        IssuerStore(),
        AuditRecorder(AuditStore(), services.db),
        cache_seconds=cache_seconds,
        clock=clock,
    )
    return issuers, Authenticator(issuers, verified_cache_seconds=cache_seconds, clock=clock)


async def test_a_key_revoked_by_another_process_ends_its_cached_tokens_when_the_issuer_cache_expires(
    services: Services, portals: Portals, database: Dsns
) -> None:
    clock = Clock()
    _, auth = _process(services, clock)
    early = portals.acme.token(exp=int(clock.now) + 600)
    assert (await auth.authenticate(f"Bearer {early}")).subject == "Patient/1"  # issuer keys cached until 30 s
    clock.now += 29
    late = portals.acme.token(sub="Patient/2", exp=int(clock.now) + 600)
    await auth.authenticate(f"Bearer {late}")  # verified at 29 s: on its own, reusable until 59 s

    # Another process revokes the portal's key: all this one can see of it is the database.
    revoke = "UPDATE issuer_keys SET revoked_at = now() WHERE kid = 'portal-key-1' AND revoked_at IS NULL"
    assert await as_owner(database.owner, lambda conn: conn.execute(revoke)) == "UPDATE 2"  # acme's and globex's
    for token in (early, late):  # this process learns it when its issuer-key cache entry expires: the bound
        assert (await auth.authenticate(f"Bearer {token}")).subject in ("Patient/1", "Patient/2")
    clock.now += 2
    for token in (late, early):  # 31 s: the late token's own 30 s have not run out, its key's have
        with pytest.raises(AuthenticationError) as refused:
            await auth.authenticate(f"Bearer {token}")
        assert (refused.value.reason, refused.value.key_id) == ("revoked-key", "portal-key-1")


async def test_a_key_revoked_in_this_process_ends_its_cached_tokens_at_once(
    services: Services, portals: Portals
) -> None:
    clock = Clock()
    issuers, auth = _process(services, clock, cache_seconds=300)
    token = portals.acme.token(exp=int(clock.now) + 600)
    await auth.authenticate(f"Bearer {token}")

    await issuers.revoke_key("acme", portals.acme.issuer, "portal-key-1")
    with pytest.raises(AuthenticationError):
        await auth.authenticate(f"Bearer {token}")


async def test_a_cached_token_is_not_served_past_its_expiry(services: Services, portals: Portals) -> None:
    # Real time: the signature's `exp` is checked against the wall clock, so only a cache that ignored it
    # could accept the token once that has passed.
    issuers = IssuerService(
        services.db, TenantStore(), IssuerStore(), AuditRecorder(AuditStore(), services.db), leeway_seconds=0
    )
    auth = Authenticator(issuers, verified_cache_seconds=300)
    expires = int(time.time()) + 2
    token = portals.acme.token(exp=expires)
    await auth.authenticate(f"Bearer {token}")
    assert (await auth.authenticate(f"Bearer {token}")).subject == "Patient/1"
    await asyncio.sleep(expires - time.time() + 0.05)
    with pytest.raises(AuthenticationError) as refused:
        await auth.authenticate(f"Bearer {token}")
    assert refused.value.reason == "expired"
