"""The webhook delivery loop. Leader-free: every process may run it; leases keep two workers from
sending the same delivery at once, and the reaper returns the leases of workers that died.

Each turn: now and then reap expired leases; lease as many due deliveries as there are free slots; run
each in its own task (`WebhookDispatcher.deliver`), at most `concurrency` at once. When nothing is due it
sleeps for `poll_interval`; when every slot is busy, until one frees up.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from uuid import UUID

import structlog

from service.domain.webhooks import WebhookDispatcher

log = structlog.get_logger("bedside.webhooks")


class WebhookWorker:
    def __init__(
        self,
        dispatcher: WebhookDispatcher,
        *,
        lease_seconds: float = 60.0,
        poll_interval: float = 0.25,
        batch_size: int = 64,
        concurrency: int = 32,
        reap_interval: float = 10.0,
    ) -> None:
        self.owner = uuid.uuid4()
        self._dispatcher = dispatcher
        self._lease = lease_seconds
        self._poll = poll_interval
        self._batch = batch_size
        self._concurrency = concurrency
        self._reap_interval = reap_interval
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Run until cancelled. Errors are logged and retried, never fatal; cancelling also cancels the
        attempts in flight, whose leases then expire and are reaped (the deliveries go again)."""
        next_reap = 0.0
        try:
            while True:
                try:
                    if time.monotonic() >= next_reap:
                        reaped = await self._dispatcher.reap()
                        if reaped:
                            log.warning("webhook.leases_reaped", count=reaped)
                        next_reap = time.monotonic() + self._reap_interval
                    free = self._concurrency - len(self._tasks)
                    claimed = (
                        await self._dispatcher.claim(self.owner, self._lease, min(self._batch, free)) if free else []
                    )
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.error("webhook.claim_failed", exc_info=True)
                    await asyncio.sleep(self._poll * 4)
                    continue
                for tenant_id, delivery_id in claimed:
                    task = asyncio.create_task(self._one(tenant_id, delivery_id))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                if not claimed or len(self._tasks) >= self._concurrency:
                    await self._idle()
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _idle(self) -> None:
        """Sleep until the poll interval passes, or a slot frees up (when all were busy)."""
        if len(self._tasks) >= self._concurrency:
            await asyncio.wait(self._tasks, timeout=self._poll, return_when=asyncio.FIRST_COMPLETED)
        else:
            await asyncio.sleep(self._poll)

    async def _one(self, tenant_id: UUID, delivery_id: UUID) -> None:
        try:
            await self._dispatcher.deliver(self.owner, tenant_id, delivery_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The database was unreachable, the request was already sent, or not even our failure could be
            # recorded (see `deliver`). The lease stays until it expires; the reaper then returns the
            # delivery to the queue and it goes again (at least once).
            log.error("webhook.delivery_failed", delivery_id=str(delivery_id), exc_info=True)
