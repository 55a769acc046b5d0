"""Every error offload raises, under one root.

    OffloadError
    ├── ConfigError                 a bad URL, option or combination of inputs
    ├── InvalidArgument (ValueError) an argument outside what the call accepts
    ├── UsageError (RuntimeError)   a call made where it cannot work (a blocking call on
    │                               offload's own event loop)
    ├── UnknownTask (LookupError)   no state for this id: never enqueued here, or expired
    ├── NotAWorkflow (LookupError)  workflow members asked of a plain task's id
    ├── SerializationError          a value the serializer cannot carry
    ├── MessageError                bytes that are not a valid offload message
    │   └── SignatureError          unsigned or tampered with, when the app has a secret
    ├── BrokerError                 the broker misbehaved
    │   └── BrokerUnavailable       the broker cannot be reached (URL shown with its password masked)
    ├── TaskFailed                  the task raised: .exc_type, .message, .traceback
    │   └── TaskTimeLimit           it ran past time_limit and was stopped
    ├── TaskExpired                 it was not started before `expires`
    ├── TaskCancelled               it was cancelled
    ├── ResultTimeout (TimeoutError) get()/wait() ran out of time; the task may still finish
    └── Retry                       raised inside a task to ask for another attempt
    SoftTimeLimitExceeded           raised inside a task at soft_time_limit (an Exception, so
                                    the task's own handlers can clean up)
"""

from __future__ import annotations


class OffloadError(Exception):
    """The root of every offload error."""


class ConfigError(OffloadError):
    """A URL, option or combination of inputs that cannot work."""


class InvalidArgument(OffloadError, ValueError):
    """An argument outside what the call accepts (a progress fraction above 1)."""


class UsageError(OffloadError, RuntimeError):
    """A call made where it cannot work, such as a blocking call on offload's own event loop."""


class UnknownTask(OffloadError, LookupError):
    """No state is stored for this task id: it was never enqueued here, or its result expired."""

    def __init__(self, task_id: str, detail: str = "never enqueued here, or its result expired") -> None:
        self.task_id = task_id
        self.detail = detail
        super().__init__(f"unknown task id {task_id!r} ({detail})")

    def __reduce__(self) -> tuple[type[UnknownTask], tuple[str, str]]:
        return (type(self), (self.task_id, self.detail))


class NotAWorkflow(OffloadError, LookupError):
    """Workflow members were asked of the id of a plain task."""


class SerializationError(OffloadError):
    """A value the configured serializer cannot carry."""


class MessageError(OffloadError):
    """Bytes that do not decode into an offload message."""


class SignatureError(MessageError):
    """A message without a valid signature, when the app has a secret."""


class BrokerError(OffloadError):
    """The broker failed to do what was asked."""


class BrokerUnavailable(BrokerError):
    """The broker cannot be reached. The message names the URL with its password masked."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"broker unavailable at {url}: {reason}")


class TaskFailed(OffloadError):
    """The task raised an exception; its type, message and traceback travel with this error."""

    def __init__(
        self,
        exc_type: str,
        message: str,
        traceback: str = "",
        *,
        task_id: str | None = None,
    ) -> None:
        self.exc_type = exc_type
        self.message = message
        self.traceback = traceback
        self.task_id = task_id
        super().__init__(f"{exc_type}: {message}" if message else exc_type)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (_rebuild_task_failed, (type(self), self.exc_type, self.message, self.traceback, self.task_id))


def _rebuild_task_failed(cls, exc_type, message, traceback, task_id):  # type: ignore[no-untyped-def]
    return cls(exc_type, message, traceback, task_id=task_id)


class TaskTimeLimit(TaskFailed):
    """The task ran past its time_limit and was stopped."""


class TaskExpired(OffloadError):
    """The task was not started before its `expires` time and never ran."""


class TaskCancelled(OffloadError):
    """The task was cancelled before it could finish."""


class ResultTimeout(OffloadError, TimeoutError):
    """Waiting for a result ran out of time; the task itself may still finish."""


class Retry(OffloadError):
    """Raise inside a task to ask for another attempt within the task's `retries`."""

    def __init__(self, countdown: float | None = None, reason: str = "") -> None:
        self.countdown = countdown
        self.reason = reason
        super().__init__(reason or "retry requested")


class SoftTimeLimitExceeded(Exception):
    """Raised inside a task when it reaches soft_time_limit, so it can clean up and stop."""
