"""The audit sequencer loop: one leader among every Bedside process, chosen by a session advisory lock.

The leader integrates committed outbox rows about every 250 ms, or at once while full batches keep
coming. Any process may run this loop; the others wait as followers and take over within a few seconds
when the leader's connection ends (its lock is released with it).
"""

from __future__ import annotations

import asyncio

import structlog

from service.domain.audit_log import AuditLog
from service.store.db import Database

log = structlog.get_logger("bedside.audit")


class Sequencer:
    def __init__(self, db: Database, audit_log: AuditLog, *, interval: float = 0.25) -> None:
        self._db = db
        self._log = audit_log
        self._interval = interval

    async def run(self) -> None:
        """Run until cancelled; errors are logged and retried, never fatal to the service."""
        while True:
            try:
                async with self._db.session() as conn:
                    if not await self._log.try_lead(conn):
                        await asyncio.sleep(self._interval * 8)
                        continue
                    log.info("audit.sequencer.leading")
                    while True:
                        integrated = await self._log.integrate(conn)
                        if integrated < self._log.batch:
                            await asyncio.sleep(self._interval)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.error("audit.sequencer.failed", exc_info=True)
                await asyncio.sleep(self._interval * 4)
