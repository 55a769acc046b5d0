"""The harness behind the conformance suite: an app in the test process, and workers that are
real processes (sqlite, redis, amqp) or, for memory://, a worker thread in this process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from offload import Offload
from offload.task import Task, TaskRef
from tests.apps import basic
from tests.conftest import urls_for
from tests.support import OffloadProcess, flush_namespace, start_worker, thread_worker, worker_options

PREFIX = "tests.apps.basic."


class Harness:
    def __init__(self, kind: str, tmp_path: Path, namespace: str) -> None:
        self.kind = kind
        self.tmp_path = tmp_path
        self.namespace = namespace
        self.url, self.results = urls_for(kind, tmp_path)
        self.app = self.make_app()
        self.workers: list[Any] = []

    def make_app(self, **kwargs: Any) -> Offload:
        app = Offload(self.url, namespace=self.namespace, results=self.results, **kwargs)
        if self.kind == "memory":  # the in-process worker needs the task functions themselves
            for name, t in basic.app.registry.items():
                app.registry[name] = Task(app, t.fn, name, t.opts)
            app.worker_start_hooks = list(basic.app.worker_start_hooks)
        return app

    def task(self, name: str) -> TaskRef:
        return self.app.ref(PREFIX + name)

    def worker(self, *args: str, extra_env: dict[str, str] | None = None, app: Offload | None = None) -> Any:
        """A worker process (``app`` is then tests.apps.basic:app, configured by ``extra_env``),
        or for memory:// a worker thread serving ``app`` (default: the harness's app)."""
        if self.kind == "memory":
            if "--pool" in args and "process" in args:
                pytest.skip("memory:// cannot reach a process pool")
            w: Any = thread_worker(app or self.app, **worker_options(args))
        else:
            w = start_worker(self.url, self.namespace, "--log-level", "info", *args, results=self.results, extra_env=extra_env)
        self.workers.append(w)
        return w

    def needs_processes(self) -> None:
        if self.kind == "memory":
            pytest.skip("memory:// lives in one process; this behaviour needs real worker processes")

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        self.app._portal.run(flush_namespace(self.app))
        self.app.close()


@pytest.fixture
def harness(kind: str, tmp_path: Path, namespace: str) -> Iterator[Harness]:
    h = Harness(kind, tmp_path, namespace)
    try:
        yield h
    finally:
        h.close()


__all__ = ["Harness", "OffloadProcess"]
