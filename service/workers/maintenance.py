"""Housekeeping that no request should pay for: purging expired idempotency keys.

Any number of processes may run it: each batch locks the rows it deletes (SKIP LOCKED), so two purgers
never wait on each other, and deleting an expired key twice is impossible.
"""

from __future__ import annotations

import asyncio

import structlog

from service.store.db import Database
from service.store.idempotency import IdempotencyStore

log = structlog.get_logger("bedside.maintenance")


class IdempotencyPurger:
    def __init__(self, db: Database, store: IdempotencyStore, *, interval: float, batch: int = 5_000) -> None:
        self._db = db
        self._store = store
        self._interval = interval
        self._batch = batch

    async def purge(self) -> int:
        """Delete expired keys, a batch per transaction, until none are left; return how many."""
        total = 0
        while True:
            async with self._db.transaction() as tx:
                purged = await self._store.purge_expired(tx, self._batch)
            total += purged
            if purged < self._batch:
                return total

    async def run(self) -> None:
        """Purge every `interval` seconds until cancelled; errors are logged and retried next time."""
        while True:
            try:
                purged = await self.purge()
                if purged:
                    log.info("idempotency.purged", count=purged)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.error("idempotency.purge_failed", exc_info=True)
            await asyncio.sleep(self._interval)
