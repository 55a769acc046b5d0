"""Coalesced state writes and acknowledgements.

Outcomes are written in batches: whatever accumulates while one batch is being written goes in
the next. A state superseded before it was written (STARTED, then SUCCEEDED a millisecond
later) is written only in its final form. Acks always follow the write of their state: a
message is acknowledged only after its outcome is stored.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from offload.brokers.base import Broker, Delivery, Store

#: A state to write: its bytes, or a function that encodes it at write time. The lazy form lets a
#: state that is superseded before the batch is written (STARTED of a 1 ms task) cost nothing.
Pending = bytes | Callable[[], bytes]

log = logging.getLogger("offload.worker")

RETRY_PAUSE_S = (0.1, 0.5, 1.0, 2.0, 5.0)


class StateWriter:
    def __init__(self, store: Store, broker: Broker, ttl_s: float | None) -> None:
        self._store, self._broker, self._ttl_s = store, broker, ttl_s
        self._states: dict[str, Pending] = {}
        self._acks: list[Delivery] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._task: asyncio.Task[None] | None = None

    def put(self, task_id: str, state: Pending, ack: Delivery | None = None) -> asyncio.Future[None]:
        """Queue a state (and the ack that must follow it); the future resolves once written."""
        self._states[task_id] = state
        if ack is not None:
            self._acks.append(ack)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(done)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain())
        return done

    async def _drain(self) -> None:
        # Yield once first, so that outcomes finishing in the same loop iteration share a batch.
        await asyncio.sleep(0)
        while self._states or self._acks:
            states = [(k, v if isinstance(v, bytes) else v()) for k, v in self._states.items()]
            acks, waiters = self._acks, self._waiters
            self._states, self._acks, self._waiters = {}, [], []
            await self._write(states, acks)
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    async def _write(self, states: Sequence[tuple[str, bytes]], acks: Sequence[Delivery]) -> None:
        # Keep trying: a state that was not stored must not be acknowledged, and dropping it
        # would lose the outcome. The lease heartbeat keeps the messages ours meanwhile.
        attempt = 0
        while True:
            try:
                if states:
                    await self._store.put_states(states, self._ttl_s)
                if acks:
                    await self._broker.ack(acks)
                return
            except Exception as e:
                pause = RETRY_PAUSE_S[min(attempt, len(RETRY_PAUSE_S) - 1)]
                log.warning("storing %d outcome(s) failed (%s); retrying in %.1f s", len(states) or len(acks), e, pause)
                attempt += 1
                await asyncio.sleep(pause)

    async def flush(self) -> None:
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)
