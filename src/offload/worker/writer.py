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
from typing import Protocol

from offload.brokers.base import Broker, Delivery, Store
from offload.brokers.states import StateRow

#: A state to write: its row, or a function that encodes it at write time. The lazy form lets a
#: state that is superseded before the batch is written (STARTED of a 1 ms task) cost nothing.
Pending = StateRow | Callable[[], StateRow]

log = logging.getLogger("offload.worker")

RETRY_PAUSE_S = (0.1, 0.5, 1.0, 2.0, 5.0)


class Refill(Protocol):
    """Asked when a batch of acks goes out: which queues, and how many places the broker may
    fill in the same round trip (see `Broker.store_and_ack`). What the round trip brought is
    handed back with `got`, for the worker's fetch loop to start (see `places.Refill`)."""

    def ask(self) -> tuple[list[str], int] | None: ...
    def got(self, asked: tuple[list[str], int] | None, deliveries: list[Delivery]) -> None:
        """After every batch written: what the refill brought, if one was asked. Only keeps
        them: it runs inside the writer's round trip."""


class StateWriter:
    def __init__(self, store: Store, broker: Broker, ttl_s: float | None, refill: Refill | None = None) -> None:
        self._store, self._broker, self._ttl_s = store, broker, ttl_s
        self._refill = refill if broker.refills_with(store) else None
        self._states: dict[str, Pending] = {}
        self._final: set[str] = set()
        self._deferred: dict[str, asyncio.TimerHandle] = {}
        self._acks: list[Delivery] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._task: asyncio.Task[None] | None = None

    def put_later(self, task_id: str, state: Pending, delay_s: float, ready: Callable[[], bool] | None = None) -> None:
        """Queue a state after ``delay_s``, unless another state of the task is put first: a
        task that ends sooner never has it written (STARTED of a short task). While ``ready``
        says no (a task still waiting for a thread), it is looked at again ``delay_s`` later."""
        self._deferred[task_id] = asyncio.get_running_loop().call_later(
            delay_s, self._put_deferred, task_id, state, delay_s, ready
        )

    def _put_deferred(self, task_id: str, state: Pending, delay_s: float, ready: Callable[[], bool] | None) -> None:
        if task_id not in self._deferred:
            return
        if ready is not None and not ready():
            self.put_later(task_id, state, delay_s, ready)
            return
        del self._deferred[task_id]
        self.put(task_id, state)

    def put(self, task_id: str, state: Pending, ack: Delivery | None = None, final: bool = False) -> asyncio.Future[None]:
        """Queue a state (``final`` if it is the task's last) and the ack that must follow it;
        the future resolves once written."""
        deferred = self._deferred.pop(task_id, None)
        if deferred is not None:
            deferred.cancel()
        self._states[task_id] = state
        if final:
            self._final.add(task_id)
        else:
            self._final.discard(task_id)
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
            states = [v if isinstance(v, StateRow) else v() for v in self._states.values()]
            acks, waiters, final = self._acks, self._waiters, self._final
            self._states, self._acks, self._waiters, self._final = {}, [], [], set()
            await self._write(states, acks, final)
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    @property
    def refilling(self) -> bool:
        """Batches are being written that will ask for a refill: the worker leaves the claiming to them."""
        return self._refill is not None and self._task is not None and not self._task.done()

    async def _write(self, states: Sequence[StateRow], acks: Sequence[Delivery], final: set[str]) -> None:
        # Keep trying: a state that was not stored must not be acknowledged, and dropping it
        # would lose the outcome. The lease heartbeat keeps the messages ours meanwhile.
        attempt = 0
        asked = self._refill.ask() if self._refill is not None and acks else None
        while True:
            try:
                got = await self._broker.store_and_ack(self._store, states, self._ttl_s, final, acks, asked)
                if self._refill is not None:
                    self._refill.got(asked, got)
                return
            except Exception as e:
                pause = RETRY_PAUSE_S[min(attempt, len(RETRY_PAUSE_S) - 1)]
                log.warning("storing %d outcome(s) failed (%s); retrying in %.1f s", len(states) or len(acks), e, pause)
                if asked is not None and attempt == 0:
                    assert self._refill is not None
                    self._refill.got(asked, [])  # retried without: the fetch loop takes over
                    asked = None
                attempt += 1
                await asyncio.sleep(pause)

    def forget(self, task_id: str) -> None:
        """Drop a deferred state of the task (it is being put back)."""
        deferred = self._deferred.pop(task_id, None)
        if deferred is not None:
            deferred.cancel()

    async def flush(self) -> None:
        for deferred in self._deferred.values():
            deferred.cancel()
        self._deferred.clear()
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)
