"""How a message the worker has finished with is settled: its final state stored, the outcome
hooks called, then the message acknowledged, requeued for a retry or dead-lettered.

Always in that order: a message is acknowledged only after its outcome is stored, and a
workflow waiting on it (an outcome hook) hears before it is gone from the broker.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import logging

from offload.app import Offload
from offload.brokers.base import Broker, Delivery, Store
from offload.errors import SerializationError
from offload.hooks import call_each
from offload.logs import task_fields
from offload.message import Envelope
from offload.result import Status, TaskState
from offload.worker.metrics import WorkerMetrics
from offload.worker.outcome import Outcome, backoff_delay
from offload.worker.writer import StateWriter

log = logging.getLogger("offload.worker")

# A message the worker fails on (not the task: the worker itself, a hook, the store) goes back
# this many times less one, a pause apart, then to the dead letters.
INTERNAL_ERRORS_BEFORE_DEAD = 3
INTERNAL_ERROR_PAUSE_S = 1.0
INTERNAL_ERRORS_REMEMBERED = 10_000


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Settle:
    """The endings of a message, each storing its state before the broker hears."""

    def __init__(self, app: Offload, broker: Broker, store: Store, writer: StateWriter,
                 metrics: WorkerMetrics | None = None) -> None:
        self._app, self._broker, self._store, self._writer = app, broker, store, writer
        self._metrics = metrics
        #: Attempts that ran to an outcome (succeeded, failed or retried).
        self.processed = 0
        # Internal errors per message id (see after_internal_error); the oldest forgotten first.
        self._internal_errors: collections.OrderedDict[str, int] = collections.OrderedDict()

    async def outcome(self, d: Delivery, env: Envelope, state: TaskState, outcome: Outcome, elapsed_ms: float) -> None:
        """A run's outcome: succeeded, retried, or failed for good."""
        self.processed += 1
        state.finished_at = _utcnow()
        if outcome.kind == "ok":
            state.status, state.result = Status.SUCCEEDED, outcome.value
            try:
                encoded = self._app.state_row(state)
            except SerializationError as e:
                state.result = None
                outcome = Outcome("error", exc_type="SerializationError", message=f"the task's return value cannot be stored: {e}")
            else:
                self._observe(env, d, "succeeded", elapsed_ms)
                log.info("succeeded %s[%s] in %.1f ms", env.name, env.id, elapsed_ms,
                         extra=task_fields(env.id, env.name, d.queue, env.attempt, elapsed_ms))
                if self._app.outcome_hooks and env.headers:
                    await self._writer.put(env.id, encoded, final=True)
                    await self.run_outcome_hooks(env, state)
                    await self._broker.ack([d])
                else:
                    self._writer.put(env.id, encoded, ack=d, final=True)
                return
        state.error = outcome.error_record()
        retry_allowed = env.attempt <= (env.retries or 0)
        if retry_allowed and outcome.kind in ("error", "timeout", "retry", "lost"):
            delay = outcome.retry_countdown
            if delay is None:
                delay = backoff_delay(env.attempt, env.retry_backoff or 1.0)
            state.status, state.finished_at = Status.RETRYING, None
            state.message = f"retrying in {delay:.1f} s"
            self._observe(env, d, "retrying", elapsed_ms)
            log.info("retry %s[%s] in %.1f s (attempt %d of %d): %s: %s", env.name, env.id, delay, env.attempt,
                     (env.retries or 0) + 1, outcome.exc_type, outcome.message,
                     extra=task_fields(env.id, env.name, d.queue, env.attempt, elapsed_ms))
            await self._writer.put(env.id, self._app.state_row(state))
            await self._broker.requeue(d, self._app.codec.encode(dataclasses.replace(env, attempt=env.attempt + 1)), delay)
            return
        if outcome.kind == "retry":
            state.error = {"type": "Retry", "message": f"no retries left after {env.attempt} attempt(s)", "traceback": ""}
        state.status = Status.FAILED
        self._observe(env, d, "failed", elapsed_ms)
        log.warning("failed %s[%s] in %.1f ms: %s: %s", env.name, env.id, elapsed_ms, state.error["type"], state.error["message"],
                    extra=task_fields(env.id, env.name, d.queue, env.attempt, elapsed_ms))
        await self._writer.put(env.id, self._app.state_row(state), final=True)
        if self._app.outcome_hooks and env.headers:
            await self.run_outcome_hooks(env, state)
        await self._broker.dead_letter(d, f"failed: {state.error['type']}: {state.error['message']}")

    def _observe(self, env: Envelope, d: Delivery, status: str, elapsed_ms: float) -> None:
        if self._metrics is not None:
            self._metrics.observe(env.name, d.queue, status, elapsed_ms / 1000)

    async def finish(self, d: Delivery, env: Envelope, state: TaskState, status: Status) -> None:
        """End the message unrun or stopped (cancelled), with ``status``."""
        state.status, state.finished_at = status, _utcnow()
        if self._app.outcome_hooks and env.headers:
            await self._writer.put(state.id, self._app.state_row(state), final=True)
            await self.run_outcome_hooks(env, state)
            await self._broker.ack([d])
            return
        await self._writer.put(state.id, self._app.state_row(state), ack=d, final=True)

    async def expire(self, d: Delivery, env: Envelope, state: TaskState) -> None:
        log.warning("expired %s[%s]: not started before its expiry", env.name, env.id,
                    extra=task_fields(env.id, env.name, d.queue, env.attempt))
        self._writer.forget(env.id)  # the STARTED of a task that never began
        state.status, state.started_at, state.finished_at = Status.EXPIRED, None, _utcnow()
        await self._app._write_states([state])
        await self.run_outcome_hooks(env, state)
        await self._broker.dead_letter(d, "expired: not started before its expiry time")

    async def not_registered(self, d: Delivery, env: Envelope, state: TaskState) -> None:
        message = f"task {env.name!r} is not registered in this worker"
        log.error("dead-lettered %s: %s", env.id, message)
        state.status, state.finished_at = Status.FAILED, _utcnow()
        state.error = {"type": "NotRegistered", "message": message, "traceback": ""}
        await self._app._write_states([state])
        await self.run_outcome_hooks(env, state)
        await self._broker.dead_letter(d, f"failed: NotRegistered: {message}")

    async def reject(self, d: Delivery, error_type: str, message: str, dead_reason: str) -> None:
        """A message refused (bad signature) or unreadable: FAILED stored (see
        `_store_rejection`), then dead-lettered with ``dead_reason``."""
        await self._store_rejection(d, error_type, message)
        await self._broker.dead_letter(d, dead_reason)

    async def _store_rejection(self, d: Delivery, error_type: str, message: str) -> None:
        """Store the task of a message refused or unreadable as FAILED, so that its sender
        (most often an app whose secret differs from this worker's) hears at once instead of
        waiting out every get().

        Nothing of the envelope is used: unverified or unreadable, it cannot be trusted. The id
        is the broker's (the one the sender's Result is keyed by); the name and owner come from
        the state the sender stored. Whoever can put a message under an id on the broker could
        already withhold or replace that very message: all this lets them add is a FAILED state
        for that id. And only a task still queued (or with no state yet: the sender's QUEUED
        write may come second, and then leaves this one be) is marked; one that started or
        ended keeps its state."""
        try:
            raw = await self._store.get_state(d.id)
            previous = None if raw is None else self._app.decode_state(raw)
            if previous is not None and previous.status is not Status.QUEUED:
                return
            state = TaskState(
                id=d.id, name=previous.name if previous else "?", status=Status.FAILED,
                queued_at=previous.queued_at if previous else None, finished_at=_utcnow(),
                meta=previous.meta if previous else {},
                error={"type": error_type, "message": message, "traceback": ""},
            )
            await self._app._write_states([state])
        except Exception as e:  # the dead letter matters more; the state stays as it was
            log.warning("could not store the failure of %s: %s", d.id, e)

    async def after_internal_error(self, d: Delivery, env: Envelope | None, error: Exception) -> None:
        """A fault of the worker (or of a hook, or of the store) while handling a message: put
        it back a few times, since a store or broker that failed may be back; then dead-letter
        it, so that a message which fails every time cannot keep the worker busy forever."""
        seen = self._internal_errors.pop(d.id, 0) + 1
        if seen < INTERNAL_ERRORS_BEFORE_DEAD:
            self._internal_errors[d.id] = seen
            while len(self._internal_errors) > INTERNAL_ERRORS_REMEMBERED:
                self._internal_errors.popitem(last=False)
            log.exception("internal error while handling message %s (%d of %d); putting it back", d.id, seen,
                          INTERNAL_ERRORS_BEFORE_DEAD)
            try:
                await self._broker.requeue(d, None, INTERNAL_ERROR_PAUSE_S)
            except Exception:
                pass  # its lease runs out and it comes back anyway
            return
        reason = f"{type(error).__name__}: {error}"
        log.exception("dead-lettered message %s after %d internal errors: %s", d.id, seen, reason)
        self._writer.forget(d.id)  # a STARTED still waiting must not land after FAILED
        try:
            if env is not None:
                state = TaskState(
                    id=env.id, name=env.name, status=Status.FAILED, attempts=env.attempt,
                    queued_at=dt.datetime.fromtimestamp(env.queued_at, dt.UTC), finished_at=_utcnow(),
                    error={"type": "InternalError", "message": f"the worker failed on it {seen} times: {reason}",
                           "traceback": ""},
                )
                await self._app._write_states([state])
            await self._broker.dead_letter(d, f"failed: InternalError: {reason}")
        except Exception as e:  # the lease runs out; the next delivery tries again
            log.warning("could not dead-letter %s (%s); it returns when its lease runs out", d.id, e)

    async def put_back(self, d: Delivery, state: TaskState | None) -> None:
        """Shutdown: requeue a message this worker will not finish, QUEUED again if it began."""
        try:
            # State first, as everywhere: once requeued, another worker may store STARTED, and a
            # late QUEUED would overwrite it.
            self._writer.forget(d.id)
            if state is not None:
                state.status = Status.QUEUED
                state.started_at = None
                await self._app._write_states([state])
            await self._broker.requeue(d)
        except Exception as e:  # the lease runs out and the message comes back anyway
            log.warning("could not put back %s (%s); it returns when its lease runs out", d.id, e)

    async def run_outcome_hooks(self, env: Envelope, state: TaskState) -> None:
        """Every final outcome of a message with headers (succeeded, failed, cancelled, expired,
        not registered) reaches the hooks: a workflow waits on each of its members."""
        if env.headers:
            await call_each(self._app.outcome_hooks, env, state)
