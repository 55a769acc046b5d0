"""How a task attempt ended, and what the worker does about it."""

from __future__ import annotations

import random
import traceback as tb
from dataclasses import dataclass
from typing import Any, Literal

from offload.errors import Retry, SoftTimeLimitExceeded, TaskCancelled, TaskFailed, TaskTimeLimit

Kind = Literal["ok", "error", "retry", "timeout", "cancelled", "lost", "expired"]

#: Longest wait between two attempts, whatever the backoff says.
MAX_BACKOFF_S = 600.0


class ExpiredBeforeStart(Exception):
    """Raised in place of a task that a thread, coming to begin it, found past its expiry: the
    task never ran, and ends expired."""


@dataclass(slots=True)
class Outcome:
    kind: Kind
    value: Any = None
    exc_type: str = ""
    message: str = ""
    traceback: str = ""
    retry_countdown: float | None = None
    # The task's last progress() call (fraction, message), from a child process: see TaskContext.
    last_report: tuple[float | None, str | None] | None = None

    @classmethod
    def from_exception(cls, exc: BaseException) -> Outcome:
        if isinstance(exc, Retry):
            return cls("retry", exc_type="Retry", message=exc.reason, retry_countdown=exc.countdown)
        if isinstance(exc, ExpiredBeforeStart):
            return cls("expired", exc_type="TaskExpired", message=str(exc))
        if isinstance(exc, TaskCancelled):
            return cls("cancelled", exc_type="TaskCancelled", message=str(exc))
        if isinstance(exc, TaskTimeLimit):
            return cls("timeout", exc_type="TaskTimeLimit", message=str(exc))
        if isinstance(exc, TaskFailed):  # re-raised from a result inside a task: keep its identity
            return cls("error", exc_type=exc.exc_type, message=exc.message, traceback=exc.traceback)
        text = "".join(tb.format_exception(exc))
        name = type(exc).__name__ if not isinstance(exc, SoftTimeLimitExceeded) else "SoftTimeLimitExceeded"
        return cls("error", exc_type=name, message=str(exc), traceback=text)

    def error_record(self) -> dict[str, str]:
        return {"type": self.exc_type, "message": self.message, "traceback": self.traceback}


def backoff_delay(attempt: int, base_s: float) -> float:
    """Exponential backoff with jitter: about base * 2**(attempt-1), randomised in [50%, 100%]
    so that tasks failing together do not retry together."""
    # The exponent is capped: 2**64 seconds is past any ceiling, and a float cannot hold 2**1024.
    ceiling = min(base_s * (2.0 ** min(attempt - 1, 64)), MAX_BACKOFF_S)
    return ceiling * random.uniform(0.5, 1.0)
