"""Task states and the `Result` handle returned by `delay()`."""

from __future__ import annotations

import datetime as dt
import enum
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from offload.errors import (
    MessageError,
    ResultTimeout,
    TaskCancelled,
    TaskExpired,
    TaskFailed,
    TaskTimeLimit,
    UnknownTask,
)
from offload.tokens import make_token
from offload.workers import WorkerInfo, live_workers

if TYPE_CHECKING:
    from offload.app import Offload
    from offload.brokers.base import Direct, Store

R = TypeVar("R")

# Waiters re-read the state at least this often even without a change signal, so a lost
# notification (a dropped datagram, a reconnecting pub/sub) costs latency, never a hang.
SAFETY_POLL_S = 1.0


class Status(enum.StrEnum):
    QUEUED = "queued"
    STARTED = "started"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"

    @property
    def done(self) -> bool:
        return self in _FINAL

    def __str__(self) -> str:
        return self.value


_FINAL = frozenset({Status.SUCCEEDED, Status.FAILED, Status.EXPIRED, Status.CANCELLED})


def _utc(ts: float | None) -> dt.datetime | None:
    return None if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC)


@dataclass(slots=True)
class TaskState:
    """What is known of a task. Stored as one record per task id in the result store."""

    id: str
    name: str
    status: Status
    progress: float | None = None
    message: str | None = None
    result: Any = None
    error: dict[str, str] | None = None  # {"type", "message", "traceback"}
    attempts: int = 0
    queued_at: dt.datetime | None = None
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # owner, workflow links
    #: The queue it was sent to (None in states stored before offload kept it).
    queue: str | None = None

    @property
    def done(self) -> bool:
        return self.status.done

    def to_record(self) -> dict[str, Any]:
        def ts(value: dt.datetime | None) -> float | None:
            return None if value is None else value.timestamp()

        return {
            "id": self.id, "name": self.name, "status": self.status.value, "progress": self.progress,
            "message": self.message, "result": self.result, "error": self.error, "attempts": self.attempts,
            "queued_at": ts(self.queued_at), "started_at": ts(self.started_at),
            "finished_at": ts(self.finished_at), "meta": self.meta, "queue": self.queue,
        }

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> TaskState:
        try:
            return cls(
                id=rec["id"], name=rec["name"], status=Status(rec["status"]), progress=rec.get("progress"),
                message=rec.get("message"), result=rec.get("result"), error=rec.get("error"),
                attempts=rec.get("attempts", 0), queued_at=_utc(rec.get("queued_at")),
                started_at=_utc(rec.get("started_at")), finished_at=_utc(rec.get("finished_at")),
                meta=rec.get("meta") or {}, queue=rec.get("queue"),
            )
        except (KeyError, ValueError, TypeError) as e:
            raise MessageError(f"corrupt task state: {e}") from None

    def error_object(self) -> Exception:
        """The exception that `get()` raises for this final state."""
        if self.status is Status.EXPIRED:
            return TaskExpired(f"task {self.id} expired before it started")
        if self.status is Status.CANCELLED:
            return TaskCancelled(f"task {self.id} was cancelled")
        err = self.error or {}
        cls = TaskTimeLimit if err.get("type") == "TaskTimeLimit" else TaskFailed
        return cls(err.get("type", "Error"), err.get("message", ""), err.get("traceback", ""), task_id=self.id)

    def outcome(self) -> Any:
        """The value of a succeeded task; raises the matching error otherwise."""
        if self.status is Status.SUCCEEDED:
            return self.result
        raise self.error_object()


class Result(Generic[R]):
    """A handle on one task: `r.get()`, `await r`, `r.state()`, `r.cancel()`, `r.token()`."""

    __slots__ = ("_sent_here", "app", "id")

    def __init__(self, app: Offload, task_id: str, sent_here: bool = False) -> None:
        self.app = app
        self.id = task_id
        # Returned by this process's own delay(): its state is known to exist.
        self._sent_here = sent_here

    def __repr__(self) -> str:
        return f"<Result {self.id}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Result) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    # -- async face (the implementation) --------------------------------------------------
    async def astate(self) -> TaskState:
        state = await self.app._read_state(self.id)
        if state is None:
            raise UnknownTask(self.id)
        return state

    async def wait(self, timeout: float | None = None) -> R:
        """Wait for the task to end without blocking the event loop; its value, or raise."""
        [state] = await wait_states(self.app, [self.id], timeout, mode="all")
        return state.outcome()  # type: ignore[no-any-return]

    def __await__(self) -> Generator[Any, None, R]:
        return self.wait().__await__()

    async def acancel(self) -> None:
        await self.app._cancel(self.id)

    # -- sync face -------------------------------------------------------------------------
    def state(self) -> TaskState:
        direct = self.app._direct()
        if direct is None:
            return self.app._portal.run(self.astate())
        [raw] = direct.get_states([self.id])
        if raw is None:
            raise UnknownTask(self.id)
        return self.app.decode_state(raw)

    def status(self) -> Status:
        return self.state().status

    def get(self, timeout: float | None = None) -> R:
        """Block until the task ends; its value, or the error it ended with."""
        direct = self.app._direct()
        if direct is None:
            return self.app._portal.run(self.wait(timeout))
        return wait_state_direct(self.app, direct, self.id, timeout, self._sent_here).outcome()  # type: ignore[no-any-return]

    def cancel(self) -> None:
        self.app._portal.run(self.acancel())

    def token(self, expires_in: float | None = None) -> str:
        """A signed capability that lets a browser read this one task through the gateway."""
        return make_token(self.app, self.id, expires_in)


def not_done_after(states: Sequence[TaskState], timeout: float | None, workers: Sequence[WorkerInfo] | None = None) -> str:
    """What a `ResultTimeout` says: where each task that has not ended stands, and for one that
    never started, whether a live worker consumes its queue (``workers``: the live ones, when
    they could be read)."""
    waiting = [s for s in states if not s.done]
    if len(waiting) == 1:
        return f"{_where(waiting[0], workers)} after waiting {timeout} s"
    where = "; ".join(_where(s, workers) for s in waiting[:5]) + ("; ..." if len(waiting) > 5 else "")
    return f"{len(waiting)} of {len(states)} tasks not done after waiting {timeout} s: {where}"


def _where(state: TaskState, workers: Sequence[WorkerInfo] | None) -> str:
    task = f"task {state.id} ({state.name})"
    if state.status is Status.QUEUED:
        return f"{task} is still queued: no worker has started it{_consumers(state.queue, workers)}"
    if state.status is Status.RETRYING:
        return f"{task} is waiting for attempt {state.attempts + 1}"
    since = "" if state.started_at is None else f" since {state.started_at.isoformat(timespec='seconds')}"
    return f"{task} is still running{since}, attempt {state.attempts}"


def _consumers(queue: str | None, workers: Sequence[WorkerInfo] | None) -> str:
    if workers is None or queue is None:
        return " (is a worker running on its queue?)"
    if not workers:
        return "; no worker is live in this namespace"
    serving = [w for w in workers if queue in w.queues]
    if not serving:
        consumed = ", ".join(sorted({q for w in workers for q in w.queues}))
        return f"; no live worker consumes queue {queue!r} (the live ones consume {consumed})"
    return f"; {len(serving)} live worker{'s' if len(serving) != 1 else ''} consume queue {queue!r}: it waits for a free place"


class _WaitRules:
    """What both waits keep to, whatever they block on: an id with no state is unknown, the
    wait ends when all (or, with mode="any", one) of the tasks have ended, it never blocks
    longer than SAFETY_POLL_S between reads, and past the deadline it says where each stands."""

    def __init__(self, ids: Sequence[str], timeout: float | None, mode: str = "all") -> None:
        self.ids, self.timeout, self.mode = ids, timeout, mode
        self.deadline = None if timeout is None else time.monotonic() + timeout

    def ended(self, states: Sequence[TaskState | None]) -> bool:
        missing = [i for i, s in zip(self.ids, states, strict=True) if s is None]
        if missing:
            raise UnknownTask(missing[0])
        done = sum(1 for s in states if s is not None and s.done)
        return done == len(self.ids) or (self.mode == "any" and done > 0)

    def next_block(self, states: Sequence[TaskState | None]) -> float | None:
        """Seconds to block before the next read; None once the deadline has passed."""
        if self.deadline is None:
            return SAFETY_POLL_S
        left = self.deadline - time.monotonic()
        if left <= 0:
            return None
        return min(left, SAFETY_POLL_S)

    def timed_out(self, states: Sequence[TaskState | None], workers: Sequence[WorkerInfo] | None) -> ResultTimeout:
        """The error once the deadline has passed, saying where each task stands (``workers``:
        the live ones, or None when they could not be read)."""
        return ResultTimeout(not_done_after([s for s in states if s is not None], self.timeout, workers))


async def wait_states(app: Offload, ids: Sequence[str], timeout: float | None, mode: str = "all") -> list[TaskState]:
    """Wait until all (or, with mode="any", one) of the tasks end, woken by the store's change
    signals. Returns the states read last. Raises ResultTimeout when time runs out."""
    rules = _WaitRules(ids, timeout, mode)
    store = await app._store()
    async with store.watch(ids) as watch:
        while True:
            states = await app._read_states(ids)
            if rules.ended(states):
                return states  # type: ignore[return-value]
            block = rules.next_block(states)
            if block is None:
                raise rules.timed_out(states, await _live_or_none(store))
            await watch.wait(block)
            finals = watch.final_states(ids)
            if finals is not None:  # each came with its change signal: no read
                return [app.decode_state(raw) for raw in finals]


async def _live_or_none(store: Store) -> list[WorkerInfo] | None:
    """The live workers, for a timeout's message; None when the registry cannot be read."""
    try:
        return await live_workers(store)
    except Exception:
        return None


def _live_or_none_sync(app: Offload) -> list[WorkerInfo] | None:
    try:
        return app.workers()
    except Exception:
        return None


def wait_state_direct(
    app: Offload, direct: Direct, task_id: str, timeout: float | None, exists: bool = False
) -> TaskState:
    """`wait_states` for one task from a blocking caller's own thread, through the store's
    `Direct` face: read the state; if it is not final, block until the store hands over the
    final one. A task known to ``exist`` (sent by this process) is waited for first and read
    only if that times out."""
    rules = _WaitRules([task_id], timeout)
    if exists:
        raw = direct.wait_final(task_id, SAFETY_POLL_S if timeout is None else min(timeout, SAFETY_POLL_S))
        if raw is not None:
            state = app.decode_state(raw)
            if state.done:
                return state
    while True:
        [raw] = direct.get_states([task_id])
        read = None if raw is None else app.decode_state(raw)
        if rules.ended([read]):
            assert read is not None
            return read
        block = rules.next_block([read])
        if block is None:
            raise rules.timed_out([read], _live_or_none_sync(app))
        raw = direct.wait_final(task_id, block)
        if raw is not None:
            state = app.decode_state(raw)
            if state.done:
                return state
