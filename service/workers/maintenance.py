"""Housekeeping that no request should pay for: purging expired idempotency keys, and writing the
summaries of failed authentications that were not audited one by one.

Any number of processes may purge: each batch locks the rows it deletes (SKIP LOCKED), so two purgers
never wait on each other, and deleting an expired key twice is impossible. Each process writes the
summaries of its own limiter (it is in memory).
"""

from __future__ import annotations

import asyncio

import structlog

from service.domain.auth_failures import AuthFailures
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


class DenialSummaries:
    """Writes the summaries of the failed authentications the limiter held back: every `interval`
    seconds, and once more when the service stops (`final`), so that none is left uncounted."""

    def __init__(self, failures: AuthFailures, *, interval: float) -> None:
        self._failures = failures
        self._interval = interval

    async def run(self) -> None:
        """Write every `interval` seconds until cancelled; what cannot be written is kept and retried."""
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.write()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.error("auth.summary_failed", count=self._failures.pending(), exc_info=True)

    async def write(self) -> None:
        counted = await self._failures.flush()
        if counted:
            log.info("auth.summarized", count=counted)

    async def final(self) -> None:
        """The last write, on stop (after the last request). If it fails, the log says how many failures
        the audit log could not be told about: a denial is never lost without a trace."""
        try:
            await self.write()
        except Exception:
            log.error("auth.denials_unrecorded", count=self._failures.pending(), exc_info=True)
