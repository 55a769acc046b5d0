"""The examples of docs/workflows.md and docs/periodic.md, run as written (on memory://, with a
worker thread). A line ``expression  # value, comment`` is checked: the expression must equal
the value."""

from __future__ import annotations

import ast
import re
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.support import thread_worker

DOCS = Path(__file__).resolve().parent.parent / "docs"
BLOCK = re.compile(r"```python\n(.*?)```", re.S)
CHECKED = re.compile(r"^(?P<expr>\S.*?)\s+#\s*(?P<value>.+)$")


def blocks(name: str) -> list[str]:
    return BLOCK.findall((DOCS / name).read_text())


def expected(comment: str) -> tuple[bool, Any]:
    """The literal a comment starts with (up to ':' or ', ' followed by words), if any."""
    cuts = [m.start() for m in re.finditer(r"[:,](?=\s+[A-Za-z])", comment)] + [len(comment)]
    for cut in cuts:
        try:
            return True, ast.literal_eval(comment[:cut].strip())
        except (ValueError, SyntaxError):
            continue
    return False, None


def run_block(source: str, namespace: dict[str, Any]) -> int:
    """Run a block line by line where lines stand alone, checking ``expr  # value`` lines."""
    checked = 0
    for statement in ast.parse(source).body:
        segment = ast.get_source_segment(source, statement) or ""
        line = source.splitlines()[statement.end_lineno - 1] if statement.end_lineno else ""
        match = CHECKED.match(line.strip())
        if isinstance(statement, ast.Expr) and match:
            known, value = expected(match.group("value"))
            if known:
                assert eval(segment, namespace) == value, segment
                checked += 1
                continue
        exec(compile(ast.Module([statement], []), "<docs>", "exec"), namespace)
    return checked


def test_the_workflow_examples_work_as_written(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFFLOAD_URL", f"memory://docs-{uuid.uuid4().hex}")
    first, *rest = blocks("workflows.md")
    namespace: dict[str, Any] = {"__name__": "docs_workflows"}
    run_block(first, namespace)
    app = namespace["app"]
    worker = thread_worker(app)
    try:
        checked = sum(run_block(block, namespace) for block in rest)
    finally:
        worker.terminate()
        worker.join()
        app.close()
    assert checked >= 10


def test_the_periodic_examples_work_as_written(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFFLOAD_URL", f"memory://docs-{uuid.uuid4().hex}")
    namespace: dict[str, Any] = {"__name__": "docs_periodic"}
    for block in blocks("periodic.md"):
        run_block(block, namespace)
    app = namespace["app"]
    assert {p.name: str(p.schedule) for p in app.periodic_tasks} == {
        "docs_periodic.nightly": "cron('0 3 * * *')",
        "docs_periodic.sweep": "every(120 s)",
        "hourly-cleanup": "every(3600 s)",
    }
    cleanup = app.registry["hourly-cleanup"]
    assert cleanup.opts.queue == "maintenance" and app.periodic_tasks[-1].catch_up
