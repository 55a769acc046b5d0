"""OpenTelemetry tracing (``pip install 'offload[otel]'``): `instrument(app)`.

Once an app is instrumented, every message it builds (``delay()``, ``adelay()``, a workflow's
steps) gets a PRODUCER span ``send {queue}``, whose W3C trace context is injected into the
message's headers; a worker of that app opens a CONSUMER span ``process {queue}`` around the
run and the settlement of each message (outcome hooks included, so a chain's next step is sent
from inside it), linked to the send span, or its child with ``parent=True``. Both carry
OpenTelemetry's messaging attributes and ``offload.task.name``, ``offload.task.attempt``; a run
that fails (an error, a time limit, a retry, a lost child) sets the process span's status to
ERROR and records the exception as an ``exception`` event.

Only the API is needed here: spans go wherever the application's tracer provider (the SDK,
configured by the application) sends them. See docs/tracing.md for what holds per executor.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

from offload.app import Offload
from offload.errors import ConfigError
from offload.message import Envelope
from offload.worker.outcome import Outcome

_missing: ImportError | None = None
try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
except ImportError as e:  # the extra is optional: `instrument` says what to install
    _missing = e

__all__ = ["instrument", "uninstrument"]

#: How the broker's URL scheme reads as OpenTelemetry's ``messaging.system``.
MESSAGING_SYSTEMS = {"amqp": "rabbitmq", "amqps": "rabbitmq", "postgres": "postgresql"}
#: Outcomes of a run that count as a failed operation (cancelled and expired do not).
FAILED_KINDS = frozenset({"error", "timeout", "retry", "lost"})


class Tracing:
    """The send hook and the run wrapper of one instrumented app."""

    def __init__(self, app: Offload, *, parent: bool, tracer_provider: Any) -> None:
        self.parent = parent
        self.tracer = trace.get_tracer("offload", tracer_provider=tracer_provider)
        scheme = app.url.scheme.split("+", 1)[0]  # redis+cluster, redis+sentinel: still redis
        self.system = MESSAGING_SYSTEMS.get(scheme, scheme)

    def attributes(self, env: Envelope, operation: str) -> dict[str, str | int]:
        return {
            "messaging.system": self.system,
            "messaging.destination.name": env.queue,
            "messaging.message.id": env.id,
            "messaging.operation.type": operation,
            "offload.task.name": env.name,
            "offload.task.attempt": env.attempt,
        }

    def send(self, env: Envelope) -> None:
        """`Offload.send_hooks`: a span for the send, its context in the message's headers.
        With no SDK configured the span is not recording and nothing is injected, so the
        message keeps empty headers and the worker's fast path."""
        with self.tracer.start_as_current_span(
            f"send {env.queue}", kind=trace.SpanKind.PRODUCER, attributes=self.attributes(env, "send"),
        ):
            propagate.inject(env.headers)

    @contextlib.contextmanager
    def run(self, env: Envelope) -> Iterator[Callable[[Outcome], None]]:
        """`Offload.run_wrappers`: the process span, current while the task runs on the loop
        and while its outcome is settled."""
        sent = propagate.extract(env.headers)
        sender = trace.get_current_span(sent).get_span_context()
        if self.parent:
            context, links = sent, None
        else:
            # A fresh root, not whatever happens to be current where the worker runs.
            context, links = otel_context.Context(), [trace.Link(sender)] if sender.is_valid else None
        with self.tracer.start_as_current_span(
            f"process {env.queue}", context=context, kind=trace.SpanKind.CONSUMER, links=links,
            attributes=self.attributes(env, "process"),
        ) as span:
            yield functools.partial(note_outcome, span)


def note_outcome(span: trace.Span, outcome: Outcome) -> None:
    """Mark a failed run: ERROR status, and the exception as OpenTelemetry records one. The
    exception itself may have been raised in a thread or a child process: its type, message
    and traceback are what the outcome kept of it."""
    if outcome.kind not in FAILED_KINDS:
        return
    description = f"{outcome.exc_type}: {outcome.message}"
    span.set_status(trace.Status(trace.StatusCode.ERROR, description))
    span.add_event("exception", {
        "exception.type": outcome.exc_type,
        "exception.message": outcome.message,
        "exception.stacktrace": outcome.traceback,
    })


def instrument(app: Offload, *, parent: bool = False, tracer_provider: Any = None) -> None:
    """Trace ``app``'s sends and, in its workers, its runs (see the module's docstring).

    ``parent=True`` makes each process span a child of its send span, so that a task's run sits
    in its caller's trace; by default it starts a trace of its own, linked to the send span, as
    OpenTelemetry advises for messaging. ``tracer_provider`` defaults to the global one.
    Instrumenting an app twice changes nothing."""
    if _missing is not None:
        raise ConfigError("offload.contrib.otel needs opentelemetry-api: pip install 'offload[otel]'") from _missing
    if any(isinstance(getattr(hook, "__self__", None), Tracing) for hook in app.send_hooks):
        return
    tracing = Tracing(app, parent=parent, tracer_provider=tracer_provider)
    app.send_hooks.append(tracing.send)
    app.run_wrappers.append(tracing.run)


def uninstrument(app: Offload) -> None:
    """Undo `instrument`: messages built from now on carry no trace context."""
    app.send_hooks[:] = [h for h in app.send_hooks if not isinstance(getattr(h, "__self__", None), Tracing)]
    app.run_wrappers[:] = [w for w in app.run_wrappers if not isinstance(getattr(w, "__self__", None), Tracing)]
