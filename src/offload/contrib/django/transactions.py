"""Enqueue after the surrounding database transaction commits.

A view that saves a row and enqueues a task about it must not let the worker start before the
row is visible (it would not find it), nor enqueue at all when the transaction rolls back.
"""

from __future__ import annotations

from typing import Any

from django.db import DEFAULT_DB_ALIAS, transaction

from offload.contrib.django.owners import Sendable
from offload.message import new_task_id
from offload.result import Result


def delay_on_commit(task: Sendable, *args: Any, using: str = DEFAULT_DB_ALIAS, **kwargs: Any) -> Result[Any]:
    """Enqueue ``task(*args, **kwargs)`` when the current transaction on ``using`` commits, at
    once outside a transaction; nothing if it rolls back. The id is chosen now, so the
    returned Result can be stored or handed to a browser before the commit (its state exists
    from the commit on). ``task`` may be a task, ``task.options(...)`` or ``app.ref(name)``.
    Note that ``using`` is taken by this function: a task argument of that name cannot pass."""
    app, name, opts = task.app, task.name, task.opts
    task_id = new_task_id()

    def enqueue() -> None:
        app._portal.run(app.sending.enqueue(name, args, kwargs, opts, task_id))

    transaction.on_commit(enqueue, using=using)
    return Result(app, task_id)
