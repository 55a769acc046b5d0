"""offload: background tasks for Python web applications.

The web app hands work off with ``task.delay()``, workers run it reliably, and the result
flows back to ``r.get()``, ``await r``, or the browser through the gateway.
"""

from offload.app import Offload
from offload.context import current
from offload.errors import (
    BrokerError,
    BrokerUnavailable,
    ConfigError,
    InvalidArgument,
    MessageError,
    NotAWorkflow,
    OffloadError,
    ResultTimeout,
    Retry,
    SerializationError,
    SignatureError,
    SoftTimeLimitExceeded,
    TaskCancelled,
    TaskExpired,
    TaskFailed,
    TaskTimeLimit,
    UnknownTask,
    UsageError,
)
from offload.result import Result, Status, TaskState
from offload.scheduler import Beat, cron, every
from offload.task import AsyncTask, Signature, Task
from offload.workflow import Workflow, WorkflowResult, chain, chord, group, race

__all__ = [
    "AsyncTask",
    "Beat",
    "BrokerError",
    "BrokerUnavailable",
    "ConfigError",
    "InvalidArgument",
    "MessageError",
    "NotAWorkflow",
    "Offload",
    "OffloadError",
    "Result",
    "ResultTimeout",
    "Retry",
    "SerializationError",
    "Signature",
    "SignatureError",
    "SoftTimeLimitExceeded",
    "Status",
    "Task",
    "TaskCancelled",
    "TaskExpired",
    "TaskFailed",
    "TaskState",
    "TaskTimeLimit",
    "UnknownTask",
    "UsageError",
    "Workflow",
    "WorkflowResult",
    "chain",
    "chord",
    "cron",
    "current",
    "every",
    "group",
    "race",
]
