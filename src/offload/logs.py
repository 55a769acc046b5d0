"""Logs as one JSON object a line (`offload worker --log-format json`), for log shippers.

Each line has ``ts`` (ISO 8601, UTC), ``level``, ``event`` (the message), ``logger`` and
``worker`` (the worker's registry id), and, when the line is about a task, ``task_id``,
``name``, ``queue``, ``attempt`` and ``duration_ms``; an exception adds ``error`` with its
traceback. The worker passes the task fields as the log call's ``extra`` (`task_fields`).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

#: The fields a log call about a task may carry in its ``extra``, and their names in a line
#: (``name`` is a LogRecord attribute of its own: the task's goes in as ``task_name``).
TASK_FIELDS = {"task_id": "task_id", "task_name": "name", "queue": "queue", "attempt": "attempt", "duration_ms": "duration_ms"}

_worker_id: str | None = None


def set_worker_id(worker_id: str | None) -> None:
    """Name the worker of this process in every JSON line (set once it has registered)."""
    global _worker_id
    _worker_id = worker_id


def task_fields(task_id: str, name: str, queue: str, attempt: int, duration_ms: float | None = None) -> dict[str, Any]:
    """The ``extra`` of a log call about one task."""
    fields: dict[str, Any] = {"task_id": task_id, "task_name": name, "queue": queue, "attempt": attempt}
    if duration_ms is not None:
        fields["duration_ms"] = round(duration_ms, 3)
    return fields


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            "logger": record.name,
            "worker": _worker_id,
        }
        for attribute, field in TASK_FIELDS.items():
            value = record.__dict__.get(attribute)
            if value is not None:
                line[field] = value
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)
