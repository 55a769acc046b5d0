"""What the dashboard's pages show, as JSON-ready dicts, read from the app's public faces.

Times are epoch seconds (the browser formats them in its own zone); a task's arguments and
traceback appear here, which is why only the dashboard, behind its password, serves them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Any

from offload import admin
from offload.app import Offload
from offload.errors import MessageError, UnknownTask
from offload.preview import call_preview
from offload.result import Status, TaskState
from offload.scheduler import zone_named

#: The children listed on a task's page (a group of 10,000 shows its first ones).
MAX_CHILDREN = 50
#: How many recent tasks of a queue are read to count the ones finished in the last minute.
RATE_WINDOW_S = 60.0
RATE_SAMPLE = 500


def _ts(value: dt.datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def summary(state: TaskState) -> dict[str, Any]:
    return {
        "id": state.id, "name": state.name, "status": state.status.value, "queue": state.queue,
        "progress": state.progress, "message": state.message, "attempts": state.attempts,
        "queued_at": _ts(state.queued_at), "started_at": _ts(state.started_at), "finished_at": _ts(state.finished_at),
    }


async def overview(app: Offload) -> dict[str, Any]:
    """The queues (depth, running, finished in the last minute) and the live workers."""
    view = await admin.overview(app)
    consumed = {q for worker in view["workers"] for q in worker["queues"]}
    names = sorted(set(view["queues"]) | consumed)
    rates = await asyncio.gather(*(_queue_activity(app, q) for q in names))
    view["queues"] = [
        {"name": q, "depth": view["queues"].get(q, 0), "running": active, "done_per_min": done}
        for q, (active, done) in zip(names, rates, strict=True)
    ]
    return view


async def _queue_activity(app: Offload, queue: str) -> tuple[int, int]:
    """Running now, and finished within `RATE_WINDOW_S`, among the queue's newest tasks."""
    since = time.time() - RATE_WINDOW_S
    started, finished = await asyncio.gather(
        app.atasks(status=Status.STARTED, queue=queue, limit=RATE_SAMPLE),
        app.atasks(queue=queue, limit=RATE_SAMPLE),
    )
    done = sum(1 for s in finished if s.done and s.finished_at is not None and s.finished_at.timestamp() >= since)
    return len(started), done


async def tasks(app: Offload, status: str | None, name: str | None, queue: str | None, limit: int,
                before: float | None) -> dict[str, Any]:
    found = await app.atasks(status=status, name=name, queue=queue, limit=limit, before=before)
    last = found[-1].queued_at if len(found) == limit and found else None
    return {"tasks": [summary(s) for s in found], "next_before": _ts(last)}


async def task(app: Offload, task_id: str) -> dict[str, Any] | None:
    """A task's whole record with its workflow parent and children; None if unknown."""
    try:
        state = await app.result(task_id).astate()
    except UnknownTask:
        return None
    detail = summary(state)
    detail.update(call=state.meta.get("call"), result=state.result, error=state.error,
                  meta={k: v for k, v in state.meta.items() if k not in ("call", "children")})
    parent_id = state.meta.get("parent")
    child_ids = [c["id"] for c in state.meta.get("children", ())[:MAX_CHILDREN] if isinstance(c, dict)]
    related = await asyncio.gather(*(_known(app, i) for i in [parent_id, *child_ids] if i))
    parent = related.pop(0) if parent_id else None
    return {"task": detail, "parent": parent, "children": [c for c in related if c is not None]}


async def _known(app: Offload, task_id: str) -> dict[str, Any] | None:
    try:
        return summary(await app.result(task_id).astate())
    except UnknownTask:
        return None


async def dead(app: Offload, limit: int) -> dict[str, Any]:
    letters = []
    for d in await admin.dead_letters(app, limit):
        name = call = None
        try:
            env = app.codec.decode(d.body)
        except MessageError:  # malformed or tampered bytes: shown by their reason alone
            pass
        else:
            name, call = env.name, call_preview(env.name, env.args, env.kwargs)
        letters.append({"id": d.id, "queue": d.queue, "reason": d.reason, "died_at": d.died_at, "name": name, "call": call})
    return {"dead": letters}


def periodic(app: Offload) -> dict[str, Any]:
    """The registered periodic tasks and when each runs next, in the app's time zone."""
    zone = zone_named(app.timezone)
    now = time.time()
    return {"timezone": app.timezone, "periodic": [
        {"name": p.name, "task": p.task, "schedule": str(p.schedule), "queue": p.opts.queue,
         "next_run": p.schedule.next_after(now, zone)}
        for p in app.periodic_tasks
    ]}
