"""An app instrumented with OpenTelemetry, for tests/test_otel.py, run by real worker processes.
Its broker comes from OFFLOAD_URL and OFFLOAD_NAMESPACE; each span the worker finishes is
written at once, as one JSON line, to the file named by OFFLOAD_TEST_SPANS (an in-memory
exporter would keep them in the worker process). OFFLOAD_TEST_OTEL_PARENT=1 instruments with
``parent=True``."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from offload import Offload, Retry, current
from offload.contrib.otel import instrument


class JsonLinesExporter(SpanExporter):
    """Appends each finished span to a file, one JSON object a line (see `span_record`)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self.path.open("a") as f:
            for span in spans:
                f.write(json.dumps(span_record(span)) + "\n")
        return SpanExportResult.SUCCESS


def span_record(span: ReadableSpan) -> dict[str, Any]:
    """What the tests compare of a span, ids as hex, the same in both processes."""
    context = span.get_span_context()
    assert context is not None
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
        "parent": None if span.parent is None else [f"{span.parent.trace_id:032x}", f"{span.parent.span_id:016x}"],
        "links": [[f"{link.context.trace_id:032x}", f"{link.context.span_id:016x}"] for link in span.links],
        "attributes": dict(span.attributes or {}),
        "status": span.status.status_code.name,
        "events": [{"name": event.name, "attributes": dict(event.attributes or {})} for event in span.events],
    }


app = Offload()
provider = TracerProvider()
spans_path = os.environ.get("OFFLOAD_TEST_SPANS")
if spans_path:
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(Path(spans_path))))
instrument(app, parent=os.environ.get("OFFLOAD_TEST_OTEL_PARENT") == "1", tracer_provider=provider)
tracer = provider.get_tracer("tests.apps.traced")


@app.task(name="traced.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="traced.fail")
def fail(message: str) -> None:
    raise ValueError(message)


@app.task(name="traced.flaky", retries=1)
def flaky() -> int:
    if current.attempt == 1:
        raise Retry(countdown=0, reason="once more")
    return current.attempt


@app.task(name="traced.nested_in_thread")
def nested_in_thread() -> str:
    """The same from a sync task, in one of the worker's task threads."""
    with tracer.start_as_current_span("inside"):
        return f"{trace.get_current_span().get_span_context().trace_id:032x}"


@app.task(name="traced.nested")
async def nested() -> str:
    """A span of the task's own, which nests under the process span on the loop."""
    with tracer.start_as_current_span("inside"):
        return f"{trace.get_current_span().get_span_context().trace_id:032x}"
