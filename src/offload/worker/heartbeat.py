"""The worker's heartbeat: every third of the lease it renews the leases of the messages it
holds and its record in the worker registry (`offload.workers`).

A worker unheard for a whole lease (frozen by SIGSTOP, a partition, an event loop stalled that
long) may find on waking that its messages went to another worker. It must then settle none of
them: `confirm` asks the broker again before a run's outcome is stored whenever the last renewal
is older than two thirds of the lease, and a message found lost is dropped here, unsettled,
since its new holder runs it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from offload.brokers.base import Broker, Delivery
from offload.logs import set_worker_id, task_fields
from offload.workers import Registration

log = logging.getLogger("offload.worker")

#: A renewal older than this share of the lease may have come too late: ask the broker.
CONFIRM_AFTER = 2 / 3


class Heartbeat:
    def __init__(self, broker: Broker, registration: Registration, holding: Callable[[], list[Delivery]]) -> None:
        self.broker = broker
        self.registration = registration
        self.lease_s = broker.lease_s
        self.interval_s = max(min(self.lease_s / 3, 10.0), 0.05)
        self._holding = holding  # the deliveries the worker holds now
        self._renewed_at = time.monotonic()
        self.lost: set[str] = set()

    async def start(self) -> None:
        """Register (the worker is ready): its record is live from now."""
        await self.registration.beat([])
        set_worker_id(self.registration.id)
        self._renewed_at = time.monotonic()

    async def run(self) -> None:
        """Beat until cancelled."""
        while True:
            await asyncio.sleep(self.interval_s)
            await self.beat()

    async def beat(self) -> None:
        held = self._holding()
        started = time.monotonic()
        try:
            for d in await self.broker.extend(held):
                self._mark_lost(d, started - self._renewed_at)
            self._renewed_at = started
        except Exception as e:
            log.warning("lease heartbeat failed: %s", e)
        try:
            await self.registration.beat([d.id for d in held if d.id not in self.lost])
        except Exception as e:
            log.warning("worker registry heartbeat failed: %s", e)

    async def confirm(self, d: Delivery, name: str, attempt: int) -> bool:
        """May this worker settle ``d`` now? False when its lease went to another worker."""
        if d.id not in self.lost:
            unheard = time.monotonic() - self._renewed_at
            if unheard <= self.lease_s * CONFIRM_AFTER:
                return True
            try:
                if not await self.broker.extend([d]):
                    return True
            except Exception as e:  # the broker is away: settling will retry, or the lease runs out
                log.warning("could not confirm the lease of %s (%s)", d.id, e)
                return True
            self._mark_lost(d, unheard)
        log.warning("lease lost on %s[%s]: another worker holds it now; the outcome of this run is dropped",
                    name, d.id, extra=task_fields(d.id, name, d.queue, attempt))
        return False

    def forget(self, message_id: str) -> None:
        """The worker is done with this message, however it ended."""
        self.lost.discard(message_id)

    def _mark_lost(self, d: Delivery, unheard_s: float) -> None:
        if d.id not in self.lost:
            self.lost.add(d.id)
            log.warning("lease of %s ran out after %.1f s unheard and went to another worker", d.id, unheard_s)

    async def leave(self) -> None:
        try:
            await self.registration.leave()
        except Exception as e:  # the record runs out by itself
            log.warning("could not remove this worker from the registry (%s)", e)
        set_worker_id(None)
