"""`app.tasks()`: the task states the result store keeps, newest first, filtered.

The store indexes each state by what `listing` says of it (status, name, queue, queued time)
when it is written, so a listing reads the index and then only the states it returns: with
100,000 stored states a page costs what a page of states costs (see docs/performance.md).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from offload.brokers.states import HistoryQuery, Listing
from offload.errors import MessageError
from offload.result import Status, TaskState

if TYPE_CHECKING:
    from offload.app import Offload

__all__ = ["MAX_LIMIT", "list_tasks", "listing", "query"]

log = logging.getLogger("offload")

MAX_LIMIT = 10_000  # one call's page; page on with ``before``


def listing(state: TaskState) -> Listing:
    """What the history files this state under."""
    queued_at = state.queued_at.timestamp() if state.queued_at is not None else time.time()
    return Listing(status=state.status.value, name=state.name, queue=state.queue or "", queued_at=queued_at)


def query(status: Status | str | None, name: str | None, queue: str | None, limit: int,
          before: dt.datetime | float | None) -> HistoryQuery:
    """The store's query for `app.tasks`' arguments; a bad one raises ValueError in one line."""
    if status is not None:
        try:
            status = Status(status)
        except ValueError:
            raise ValueError(f"unknown status {status!r}: one of {', '.join(s.value for s in Status)}") from None
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be a whole number from 0 to {MAX_LIMIT}, got {limit!r}")
    if isinstance(before, dt.datetime):
        if before.tzinfo is None:
            raise ValueError("before must be an aware datetime (give it a tzinfo, e.g. datetime.UTC)")
        before = before.timestamp()
    return HistoryQuery(status=None if status is None else status.value, name=name, queue=queue,
                        limit=limit, before=before)


async def list_tasks(app: Offload, wanted: HistoryQuery) -> list[TaskState]:
    store = await app._store()
    return decode_all(app, await store.history(wanted))


def decode_all(app: Offload, found: Sequence[tuple[str, bytes]]) -> list[TaskState]:
    # Anyone who can write to the store can plant bytes there: a state that does not decode is
    # left out of the list (and logged), so one bad record cannot break every listing.
    states = []
    for task_id, data in found:
        try:
            states.append(app.decode_state(data))
        except MessageError as e:
            log.warning("left task %s out of the history: %s", task_id, e)
    return states
