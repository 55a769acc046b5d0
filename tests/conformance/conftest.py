"""The harness behind the conformance suite: an app in the test process, and workers that are
real processes (sqlite, redis, amqp) or, for memory://, a worker thread in this process."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from offload import Offload
from offload.task import Task, TaskRef
from offload.worker import Worker
from tests.apps import basic
from tests.conftest import urls_for
from tests.support import OffloadProcess, start_worker

PREFIX = "tests.apps.basic."


class InProcessWorker:
    """memory:// cannot cross processes: run the worker on its own loop in a thread."""

    def __init__(self, app: Offload, args: tuple[str, ...]) -> None:
        opts = _parse_worker_args(args)
        self.worker = Worker(app, handle_signals=False, **opts)
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self._ready.wait(10), "in-process worker did not start"

    def _run(self) -> None:
        async def main() -> None:
            task = asyncio.create_task(self.worker.run())
            while self.worker._stopping is None:
                await asyncio.sleep(0.001)
            self._ready.set()
            await task

        asyncio.run(main())

    def stop(self) -> None:
        if self.thread.is_alive():
            self.worker.stop()
            self.thread.join(40)


def _parse_worker_args(args: tuple[str, ...]) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    it = iter(args)
    for a in it:
        if a in ("-c", "--concurrency"):
            opts["concurrency"] = int(next(it))
        elif a in ("-q", "--queues"):
            opts["queues"] = next(it).split(",")
        elif a == "--pool":
            opts["pool"] = next(it)
        elif a == "--prefetch":
            opts["prefetch"] = int(next(it))
        elif a == "--grace":
            opts["grace_s"] = float(next(it))
        elif a == "--burst":
            opts["burst"] = True
    return opts


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
            for name, t in basic.app.tasks.items():
                app.tasks[name] = Task(app, t.fn, name, t.opts)
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
            w: Any = InProcessWorker(app or self.app, args)
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
        self.app._portal.run(_flush(self.app))
        self.app.close()


async def _flush(app: Offload) -> None:
    backends = await app._backends()
    await backends.broker.flush_namespace()
    await backends.store.flush_namespace()


@pytest.fixture
def harness(kind: str, tmp_path: Path, namespace: str) -> Iterator[Harness]:
    h = Harness(kind, tmp_path, namespace)
    try:
        yield h
    finally:
        h.close()


__all__ = ["Harness", "OffloadProcess"]
