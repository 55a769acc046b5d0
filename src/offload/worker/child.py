"""Running one task attempt inside a process-pool child."""

from __future__ import annotations

import signal
from typing import Any

from offload.app import Offload
from offload.context import TaskContext, reset_context, set_context
from offload.errors import SoftTimeLimitExceeded
from offload.result import TaskState
from offload.worker.outcome import Outcome


def _on_alarm(signum: int, frame: Any) -> None:
    raise SoftTimeLimitExceeded("soft time limit reached")


def run_in_child(
    app: Offload, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], task_id: str, attempt: int,
    headers: dict[str, Any], soft_limit: float | None, state_record: dict[str, Any],
) -> Outcome:
    task = app.registry.get(name)
    if task is None:
        return Outcome("error", exc_type="NotRegistered", message=f"task {name!r} is not registered in {app.spec}")

    def report_progress(fraction: float | None, message: str | None) -> None:
        state = TaskState.from_record(state_record)
        state.progress, state.message = fraction, message
        app._portal.run(app._write_states([state]))

    def publish(channel: str, data: Any) -> None:
        app._portal.run(app.apublish(channel, data))

    ctx = TaskContext(task_id, name, attempt, headers, report_progress, publish)
    token = set_context(ctx)
    if soft_limit:
        signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, soft_limit)
    try:
        outcome = Outcome("ok", value=task.fn(*args, **kwargs))
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        outcome = Outcome.from_exception(e)
    finally:
        if soft_limit:
            signal.setitimer(signal.ITIMER_REAL, 0)
        reset_context(token)
    outcome.last_report = ctx.last_report
    return outcome
