"""offload.contrib.otel across a real worker process: the caller's spans are kept in memory, the
worker's (tests.apps.traced) are written to a file, and the two are matched by their ids."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from offload import Offload, TaskFailed, chain
from offload.contrib.otel import instrument, uninstrument
from offload.task import Options
from tests.apps.traced import span_record
from tests.conftest import REDIS_URL, require_server
from tests.support import OffloadProcess, flush_namespace, start_worker, wait_until

T = 30  # seconds a task may take before a test fails


@pytest.fixture(scope="module")
def provider() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


@pytest.fixture
def sent(provider: tuple[TracerProvider, InMemorySpanExporter]) -> Iterator[InMemorySpanExporter]:
    """The caller's finished spans, this test's only."""
    provider[1].clear()
    yield provider[1]
    provider[1].clear()


class Traced:
    """A caller app and a worker of tests.apps.traced on one broker, the worker's spans in a file."""

    def __init__(self, url: str, namespace: str, spans: Path, provider: TracerProvider, *, parent: bool = False) -> None:
        self.spans = spans
        self.app = Offload(url, namespace=namespace)
        instrument(self.app, tracer_provider=provider)
        extra = {"OFFLOAD_TEST_SPANS": str(spans), **({"OFFLOAD_TEST_OTEL_PARENT": "1"} if parent else {})}
        self.worker: OffloadProcess = start_worker(url, namespace, app="tests.apps.traced:app", extra_env=extra)

    def worker_spans(self, name: str, count: int = 1) -> list[dict[str, Any]]:
        """The worker's spans called ``name`` once there are ``count`` of them (a span is written
        when it ends: after the result is stored, so a little after get() returns)."""

        def found() -> list[dict[str, Any]]:
            lines = self.spans.read_text().splitlines() if self.spans.exists() else []
            return [s for s in map(json.loads, lines) if s["name"] == name]

        wait_until(lambda: len(found()) >= count, timeout=T, message=f"{count} worker span(s) {name!r}")
        return found()

    def close(self) -> None:
        self.worker.stop()
        self.app._portal.run(flush_namespace(self.app))
        self.app.close()


@pytest.fixture
def traced(tmp_path: Path, namespace: str, provider: tuple[TracerProvider, InMemorySpanExporter]) -> Iterator[Traced]:
    t = Traced(f"sqlite:///{tmp_path}/otel.db", namespace, tmp_path / "spans.jsonl", provider[0])
    yield t
    t.close()


@pytest.fixture
def traced_parented(tmp_path: Path, namespace: str, provider: tuple[TracerProvider, InMemorySpanExporter]) -> Iterator[Traced]:
    t = Traced(f"sqlite:///{tmp_path}/otel.db", namespace, tmp_path / "spans.jsonl", provider[0], parent=True)
    yield t
    t.close()


def ids(span: dict[str, Any]) -> list[str]:
    return [span["trace_id"], span["span_id"]]


def the_send_span(exporter: InMemorySpanExporter) -> dict[str, Any]:
    (send,) = [span_record(s) for s in exporter.get_finished_spans() if s.name == "send default"]
    return send


def check_linked_run(t: Traced, sent: InMemorySpanExporter, provider: TracerProvider, system: str) -> None:
    # Given a caller inside a span of its own
    with provider.get_tracer("test").start_as_current_span("request") as request:
        # When it sends a task that a worker runs
        result = t.app.send("traced.add", 1, 2)
    assert result.get(timeout=T) == 3
    # Then its send span is a PRODUCER child of the request, with the messaging attributes
    send = the_send_span(sent)
    context = request.get_span_context()
    assert send["kind"] == "PRODUCER"
    assert send["parent"] == [f"{context.trace_id:032x}", f"{context.span_id:016x}"]
    expected = {
        "messaging.system": system, "messaging.destination.name": "default", "messaging.message.id": result.id,
        "offload.task.name": "traced.add", "offload.task.attempt": 1,
    }
    assert send["attributes"] == {**expected, "messaging.operation.type": "send"}
    # And the worker's CONSUMER span starts a trace of its own, linked to the send span
    (process,) = t.worker_spans("process default")
    assert process["kind"] == "CONSUMER"
    assert process["parent"] is None
    assert process["links"] == [ids(send)]
    assert process["trace_id"] != send["trace_id"]
    assert process["attributes"] == {**expected, "messaging.operation.type": "process"}
    assert process["status"] == "UNSET"


def test_the_process_span_is_linked_to_the_send_span(
    traced: Traced, sent: InMemorySpanExporter, provider: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    check_linked_run(traced, sent, provider[0], "sqlite")


def test_on_redis_too(tmp_path: Path, namespace: str, sent: InMemorySpanExporter,
                      provider: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    require_server("redis")
    t = Traced(REDIS_URL, namespace, tmp_path / "spans.jsonl", provider[0])
    try:
        check_linked_run(t, sent, provider[0], "redis")
    finally:
        t.close()


def test_with_parent_the_process_span_is_the_send_spans_child(traced_parented: Traced, sent: InMemorySpanExporter) -> None:
    assert traced_parented.app.send("traced.add", 2, 2).get(timeout=T) == 4
    send = the_send_span(sent)
    (process,) = traced_parented.worker_spans("process default")
    assert process["parent"] == ids(send)
    assert process["trace_id"] == send["trace_id"]
    assert process["links"] == []


def test_a_failed_run_sets_error_and_records_the_exception(traced: Traced, sent: InMemorySpanExporter) -> None:
    with pytest.raises(TaskFailed):
        traced.app.send("traced.fail", "boom").get(timeout=T)
    (process,) = traced.worker_spans("process default")
    assert process["status"] == "ERROR"
    (event,) = process["events"]
    assert event["name"] == "exception"
    assert event["attributes"]["exception.type"] == "ValueError"
    assert event["attributes"]["exception.message"] == "boom"
    assert "raise ValueError(message)" in event["attributes"]["exception.stacktrace"]


def test_each_attempt_has_a_process_span_linked_to_the_one_send(traced: Traced, sent: InMemorySpanExporter) -> None:
    assert traced.app.send("traced.flaky").get(timeout=T) == 2
    first, second = sorted(traced.worker_spans("process default", count=2), key=lambda s: s["attributes"]["offload.task.attempt"])
    assert (first["attributes"]["offload.task.attempt"], second["attributes"]["offload.task.attempt"]) == (1, 2)
    assert first["status"] == "ERROR"  # the attempt did not succeed, though the task did
    assert second["status"] == "UNSET"
    assert first["links"] == second["links"] == [ids(the_send_span(sent))]


@pytest.mark.parametrize("task", ["traced.nested", "traced.nested_in_thread"], ids=["async", "thread"])
def test_a_tasks_own_spans_nest_under_the_process_span(traced_parented: Traced, sent: InMemorySpanExporter, task: str) -> None:
    inner_trace = traced_parented.app.send(task).get(timeout=T)
    (process,) = traced_parented.worker_spans("process default")
    (inside,) = traced_parented.worker_spans("inside")
    assert inside["parent"] == ids(process)
    assert inner_trace == process["trace_id"] == the_send_span(sent)["trace_id"]


def test_with_parent_a_chain_stays_in_the_callers_trace(traced_parented: Traced, sent: InMemorySpanExporter) -> None:
    add = traced_parented.app.ref("traced.add")
    assert chain(add.s(1, 2), add.s(10)).delay().get(timeout=T) == 13
    first, second = traced_parented.worker_spans("process default", count=2)
    assert first["trace_id"] == second["trace_id"] == the_send_span(sent)["trace_id"]


def test_by_default_a_chains_next_step_is_sent_from_inside_the_step_before(traced: Traced, sent: InMemorySpanExporter) -> None:
    add = traced.app.ref("traced.add")
    assert chain(add.s(1, 2), add.s(10)).delay().get(timeout=T) == 13
    first, second = traced.worker_spans("process default", count=2)
    (next_send,) = traced.worker_spans("send default")
    assert first["links"] == [ids(the_send_span(sent))]
    assert next_send["parent"] == ids(first)
    assert second["links"] == [ids(next_send)]


def test_no_trace_context_without_a_recording_tracer() -> None:
    app = Offload("memory://")
    instrument(app, tracer_provider=trace.NoOpTracerProvider())
    instrument(app, tracer_provider=trace.NoOpTracerProvider())  # twice: one hook still
    assert len(app.send_hooks) == len(app.run_wrappers) == 1
    # An empty context keeps the headers empty, and with them the worker's fast path.
    assert app.build("traced.add", (1, 2), {}, Options()).headers == {}
    uninstrument(app)
    assert app.send_hooks == app.run_wrappers == []
