"""`current`: what a running task knows about itself (id, attempt) and can do (progress, publish).

The context travels in a ContextVar, which the worker copies into the thread or child process
that runs the task. `current.state` is one dict per process, filled by @app.on_worker_start.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from offload.errors import InvalidArgument, OffloadError, TaskCancelled

# Progress writes are throttled so a loop calling progress() per row costs almost nothing.
PROGRESS_INTERVAL_S = 0.1

worker_state: dict[str, Any] = {}


@dataclass(slots=True)
class TaskContext:
    id: str
    name: str
    attempt: int
    headers: dict[str, Any]
    # Callbacks supplied by the executor; they do the I/O on the worker's loop (or the child's).
    report_progress: Callable[[float | None, str | None], None]
    publish: Callable[[str, Any], None]
    cancelled: bool = False
    last_progress_at: float = field(default=0.0)
    # The last progress() call, kept even when the throttle dropped its write: the final state
    # carries it, so a finished task never shows a stale fraction or message.
    last_report: tuple[float | None, str | None] | None = None


_ctx: contextvars.ContextVar[TaskContext | None] = contextvars.ContextVar("offload_task", default=None)


class _Current:
    """Proxy to the running task's context; raises a clear error outside a task."""

    def _get(self) -> TaskContext:
        ctx = _ctx.get()
        if ctx is None:
            raise OffloadError("offload.current is only available inside a running task")
        if ctx.cancelled:
            raise TaskCancelled(f"task {ctx.id} was cancelled")
        return ctx

    @property
    def id(self) -> str:
        return self._get().id

    @property
    def name(self) -> str:
        return self._get().name

    @property
    def attempt(self) -> int:
        return self._get().attempt

    @property
    def headers(self) -> dict[str, Any]:
        return self._get().headers

    @property
    def state(self) -> dict[str, Any]:
        return worker_state

    @property
    def active(self) -> bool:
        return _ctx.get() is not None

    def progress(self, fraction: float | None, message: str | None = None, *, force: bool = False) -> None:
        """Report progress (0..1) and an optional message, visible in r.state() and browsers.
        Calls closer together than PROGRESS_INTERVAL_S are dropped, except with force=True."""
        ctx = self._get()
        if fraction is not None and not 0.0 <= fraction <= 1.0:
            raise InvalidArgument(f"progress must be between 0 and 1, got {fraction}")
        ctx.last_report = (fraction, message)
        now = time.monotonic()
        if not force and now - ctx.last_progress_at < PROGRESS_INTERVAL_S:
            return
        ctx.last_progress_at = now
        ctx.report_progress(fraction, message)

    def publish(self, channel: str, data: Any) -> None:
        """Publish on a pub/sub channel (seen by subscribers and browsers on the gateway)."""
        self._get().publish(channel, data)


current = _Current()


def set_context(ctx: TaskContext | None) -> contextvars.Token[TaskContext | None]:
    return _ctx.set(ctx)


def reset_context(token: contextvars.Token[TaskContext | None]) -> None:
    _ctx.reset(token)


def get_context() -> TaskContext | None:
    return _ctx.get()
