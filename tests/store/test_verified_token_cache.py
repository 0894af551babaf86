"""Verified tokens are reused until they expire, never past the issuer-key cache lifetime."""

from __future__ import annotations

import time

import asyncpg
import pytest

from service.domain.auth import Authenticator
from service.errors import AuthenticationError
from tests.conftest import Portals, Services


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def test_a_cached_token_stops_working_when_its_issuer_key_is_withdrawn_within_the_ttl(
    services: Services, portals: Portals, database
) -> None:
    clock = Clock()
    auth = Authenticator(services.issuers, audience="bedside", verified_cache_seconds=30, clock=clock)
    token = portals.acme.token(exp=int(clock.now) + 600)
    principal = await auth.authenticate(f"Bearer {token}")
    assert principal.subject == "Patient/1"

    owner = await asyncpg.connect(database.owner)
    try:  # the operator withdraws the portal's key
        await owner.execute("UPDATE issuer_keys SET revoked_at = now()")
    finally:
        await owner.close()
    assert (await auth.authenticate(f"Bearer {token}")).subject == "Patient/1"  # within the 30 s
    clock.now += 31
    with pytest.raises(AuthenticationError):
        await auth.authenticate(f"Bearer {token}")


async def test_a_cached_token_is_not_served_past_its_expiry(services: Services, portals: Portals, database) -> None:
    clock = Clock()
    auth = Authenticator(
        services.issuers, audience="bedside", leeway_seconds=0, verified_cache_seconds=300, clock=clock
    )
    token = portals.acme.token(exp=int(clock.now) + 5)
    await auth.authenticate(f"Bearer {token}")
    owner = await asyncpg.connect(database.owner)
    try:  # so that only the cache could still accept it
        await owner.execute("UPDATE issuer_keys SET revoked_at = now()")
    finally:
        await owner.close()
    clock.now += 3
    assert (await auth.authenticate(f"Bearer {token}")).subject == "Patient/1"  # cached, not yet expired
    clock.now += 7
    with pytest.raises(AuthenticationError):
        await auth.authenticate(f"Bearer {token}")
