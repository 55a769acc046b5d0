"""Operations on a namespace: queue status, purge, dead letters and their replay, and deleting
it altogether."""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from offload.app import Offload
from offload.brokers.base import DeadLetter, OutgoingMessage, QueueStats
from offload.errors import MessageError, UnknownTask
from offload.preview import call_preview
from offload.result import SAFETY_POLL_S, Status, TaskState
from offload.workers import live_workers


async def status(app: Offload) -> QueueStats:
    return await (await app._broker()).stats()


async def overview(app: Offload) -> dict[str, Any]:
    """The namespace at a glance, as `offload status --json` prints it: its queues and its live
    workers (see `offload.workers.WorkerInfo`)."""
    backends = await app._backends()
    stats = await backends.broker.stats()
    workers = await live_workers(backends.store)
    return {
        "namespace": app.namespace, "broker": app.url.masked, "queues": dict(stats.queued), "running": stats.running,
        "scheduled": stats.scheduled, "dead": stats.dead, "workers": [w.to_json() for w in workers],
    }


async def purge(app: Offload, queue: str) -> int:
    return await (await app._broker()).purge(queue)


async def flush(app: Offload) -> None:
    """Delete everything of the app's namespace: its queues and messages in the broker, its
    states and keys in the result store. Workers of the namespace should be stopped first."""
    backends = await app._backends()
    await backends.broker.flush_namespace()
    await backends.store.flush_namespace()


async def dead_letters(app: Offload, limit: int = 100) -> list[DeadLetter]:
    return await (await app._broker()).dead_letters(limit)


async def replay(app: Offload, ids: Sequence[str] | None = None) -> list[str]:
    """Enqueue dead letters again (all when ``ids`` is None) as fresh first attempts.

    A message that decodes gets attempt 1 and no expiry; bytes that never decoded are put back
    as they were, so the worker dead-letters them again with the same reason.
    """
    backends = await app._backends()
    replayed = await backends.broker.replay(None if ids is None else list(ids))
    for dead in replayed:
        body, name, queue, priority = dead.body, "?", dead.queue, 0
        try:
            env = app.codec.decode(dead.body)
        except MessageError:
            pass
        else:
            env = dataclasses.replace(env, attempt=1, expires=None, eta=None)
            body, name, priority = app.codec.encode(env), env.name, env.priority
            queued = TaskState(id=env.id, name=name, status=Status.QUEUED, queue=queue, queued_at=dt.datetime.now(dt.UTC),
                               meta={"call": call_preview(env.name, env.args, env.kwargs)})
            await backends.store.put_states([app.state_row(queued)], app.result_ttl_s)
        await backends.broker.enqueue(OutgoingMessage(id=dead.id, queue=queue, body=body, priority=priority))
    return [d.id for d in replayed]


async def purge_dead(app: Offload, ids: Sequence[str] | None = None) -> list[str]:
    """Delete dead letters (all when ``ids`` is None) for good; their ids.

    The broker hands them over as it does for `replay`, and nothing is enqueued: the task
    states stay, so the history still shows how each one ended."""
    taken = await (await app._broker()).replay(None if ids is None else list(ids))
    return [d.id for d in taken]


async def follow(app: Offload, task_id: str, timeout: float | None = None) -> AsyncIterator[TaskState]:
    """Every state a task goes through (as seen by this reader), ending with its final one."""
    deadline = None if timeout is None else time.monotonic() + timeout
    store = await app._store()
    async with store.watch([task_id]) as watch:
        last: Any = None
        while True:
            state = await app._read_state(task_id)
            if state is None:
                raise UnknownTask(task_id)
            key = (state.status, state.progress, state.message)
            if key != last:
                last = key
                yield state
            if state.done:
                return
            left = SAFETY_POLL_S if deadline is None else min(SAFETY_POLL_S, deadline - time.monotonic())
            if left <= 0:
                return
            await watch.wait(left)
