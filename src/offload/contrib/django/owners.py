"""Tasks started for a signed-in user: they carry an ``owner`` header (``str(user.pk)``) and a
row in `OwnedTask`, which the worker marks finished and `AnnounceMiddleware` turns into one
message on the user's next page.

    r = delay_for(request, export_stats, since)                      # sync views
    r = await adelay_for(request, export_stats, since)               # async views
    r = for_user(request.user, export_stats, label="Your export").delay(since)
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from asgiref.sync import sync_to_async
from django.db import DEFAULT_DB_ALIAS, close_old_connections, transaction

from offload.message import Envelope, new_task_id
from offload.result import Result, Status, TaskState
from offload.task import Options

if TYPE_CHECKING:
    from django.http import HttpRequest

    from offload.app import Offload

log = logging.getLogger("offload.django")

OWNER_HEADER = "owner"


class Sendable(Protocol):
    """A task, ``app.ref(name)`` or ``task.options(...)``: what can be sent."""

    app: Offload
    name: str
    opts: Options


def owner_of(user: Any) -> str | None:
    """The owner header of a user: its primary key as a string; None when not signed in."""
    if user is None or not getattr(user, "is_authenticated", False):
        return None
    return str(user.pk)


@dataclass(frozen=True, slots=True)
class OwnedCall:
    """A task bound to its owner; ``delay()``/``adelay()`` as on a task."""

    target: Sendable
    owner: str | None
    label: str
    announce: bool = True
    using: str = DEFAULT_DB_ALIAS

    def _opts(self) -> Options:
        if self.owner is None:
            return self.target.opts
        return self.target.opts.merge(headers={OWNER_HEADER: self.owner})

    def delay(self, *args: Any, **kwargs: Any) -> Result[Any]:
        """Record the task for its owner and enqueue it once the surrounding transaction commits
        (at once outside one): the worker must find the row when the task ends. Returns its
        Result at once; its state exists from the commit on."""
        app, name, opts = self.target.app, self.target.name, self._opts()
        task_id = new_task_id()
        recorded = self.owner is not None and self.announce
        if recorded:
            from offload.contrib.django.models import OwnedTask

            OwnedTask.objects.using(self.using).create(task_id=task_id, owner=self.owner, label=self.label)

        def enqueue() -> None:
            try:
                app._portal.run(app.sending.enqueue(name, args, kwargs, opts, task_id))
            except BaseException:
                if recorded:  # never sent: nothing will ever finish it
                    OwnedTask.objects.using(self.using).filter(task_id=task_id).delete()
                raise

        transaction.on_commit(enqueue, using=self.using)
        return Result(app, task_id)

    async def adelay(self, *args: Any, **kwargs: Any) -> Result[Any]:
        """The same from async code, where every query commits on its own."""
        app, name, opts = self.target.app, self.target.name, self._opts()
        task_id = new_task_id()
        if self.owner is None or not self.announce:
            return await app.sending.enqueue(name, args, kwargs, opts, task_id)
        from offload.contrib.django.models import OwnedTask

        await OwnedTask.objects.using(self.using).acreate(task_id=task_id, owner=self.owner, label=self.label)
        try:
            return await app.sending.enqueue(name, args, kwargs, opts, task_id)
        except BaseException:
            await OwnedTask.objects.using(self.using).filter(task_id=task_id).adelete()
            raise


def for_user(user: Any, task: Sendable, *, label: str | None = None, announce: bool = True,
             using: str = DEFAULT_DB_ALIAS) -> OwnedCall:
    """``task`` owned by ``user`` (anonymous: no owner, no announcement). ``label`` names it in
    the message the user gets when it ends (default: the function's name)."""
    return OwnedCall(task, owner_of(user), label or _default_label(task.name), announce, using)


def delay_for(request: HttpRequest, task: Sendable, *args: Any, **kwargs: Any) -> Result[Any]:
    """Enqueue ``task(*args, **kwargs)`` for the request's user (see `OwnedCall.delay`)."""
    return for_user(getattr(request, "user", None), task).delay(*args, **kwargs)


async def adelay_for(request: HttpRequest, task: Sendable, *args: Any, **kwargs: Any) -> Result[Any]:
    """`delay_for` for async views."""
    user = await request.auser()
    return await for_user(user, task).adelay(*args, **kwargs)


def prune(older_than: dt.timedelta, using: str = DEFAULT_DB_ALIAS) -> int:
    """Forget owned tasks started longer ago than ``older_than`` and never announced: their
    worker died with them, or their user never came back. Returns how many. (A nightly
    periodic task is the place for it.)"""
    from offload.contrib.django.models import OwnedTask

    deleted, _ = OwnedTask.objects.using(using).filter(created_at__lt=dt.datetime.now(dt.UTC) - older_than).delete()
    return int(deleted)


def _default_label(name: str) -> str:
    return name.rpartition(".")[2].replace("_", " ")


# -- in the worker ---------------------------------------------------------------------------
async def on_outcome(env: Envelope, state: TaskState) -> None:
    """An outcome hook of the project's app: mark an owned task finished. It runs after the
    final state is stored and before the message is acknowledged; it must not raise, or the
    task would run again for a bookkeeping error."""
    if env.headers.get(OWNER_HEADER) is None:
        return
    try:
        await sync_to_async(_record_outcome, thread_sensitive=True)(state)
    except Exception:
        log.exception("could not record the end of task %s for its owner", state.id)


def _record_outcome(state: TaskState) -> None:
    from offload.contrib.django.models import OwnedTask

    close_old_connections()  # a worker lives for days: never reuse a connection the server dropped
    OwnedTask.objects.filter(task_id=state.id, finished_at=None).update(
        status=state.status.value, detail=outcome_detail(state)[:2000],
        finished_at=state.finished_at or dt.datetime.now(dt.UTC),
    )


def outcome_detail(state: TaskState) -> str:
    """What the user is told beside the status: the error's message, or the ``"message"`` a
    task returned in a dict (``return {"message": "342 rows exported", ...}``)."""
    if state.status is Status.SUCCEEDED:
        result = state.result
        if isinstance(result, Mapping) and isinstance(result.get("message"), str):
            return str(result["message"])
        return ""
    if state.error:
        return state.error.get("message") or state.error.get("type") or ""
    return ""
