"""Apps, workers and beats for the tests of tests/apps/flows.py: real `offload worker` and
`offload beat` processes for sqlite, redis and amqp; for memory://, which cannot cross
processes, workers and beats in threads of the test process, each on its own event loop.

Several workers or beats start (and stop) side by side, so a test pays one process start-up,
not one per process."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from offload import Offload, ratelimit
from offload.scheduler import Beat
from offload.task import Signature, Task
from tests.apps import flows
from tests.conftest import KINDS, require_server, urls_for
from tests.support import InThread, OffloadProcess, env_for, flush_namespace, thread_worker, worker_options

APP_SPEC = "tests.apps.flows:app"
PREFIX = "tests.apps.flows."


def thread_beat(app: Offload, catch_up: bool) -> InThread:
    b = Beat(app, catch_up=catch_up)
    runner = InThread(app, b.run, lambda: b._stop is not None, b.stop)
    runner.beat = b  # type: ignore[attr-defined]
    return runner


class Harness:
    def __init__(self, kind: str, tmp_path: Path, namespace: str) -> None:
        self.kind, self.tmp_path, self.namespace = kind, tmp_path, namespace
        self.url, self.results = urls_for(kind, tmp_path)
        self.dir = tmp_path / "traces"
        self.dir.mkdir()
        self.app = self.make_app()
        self.running: list[Any] = []

    def make_app(self, **kwargs: Any) -> Offload:
        """An app on this test's broker. For memory:// it carries the flows tasks themselves,
        since its workers run in this process."""
        app = Offload(self.url, namespace=self.namespace, results=self.results, **kwargs)
        if self.kind == "memory":
            for name, t in flows.app.registry.items():
                app.registry[name] = Task(app, t.fn, name, t.opts)
                if t.opts.rate_limit:
                    ratelimit.install(app)
            app.periodic_tasks = list(flows.app.periodic_tasks)
        return app

    def s(self, name: str, *args: Any, **kwargs: Any) -> Signature:
        return self.app.ref(PREFIX + name).s(*args, **kwargs)

    def workers(self, count: int, *args: str, wait: bool = True) -> list[Any]:
        """``count`` workers (``args`` as for `offload worker`), started side by side. With
        ``wait=False`` worker processes may still be starting (see `ready`)."""
        if self.kind == "memory":
            started: list[Any] = [thread_worker(self.make_app(), **worker_options(args)) for _ in range(count)]
            self.running += started
            return started
        return self._processes(count, ["worker", APP_SPEC, "--log-level", "info", *args], "worker ready", wait)

    def worker(self, *args: str) -> Any:
        return self.workers(1, *args)[0]

    def beats(self, count: int, *args: str) -> list[Any]:
        """``count`` beats (``args`` as for `offload beat`), started side by side."""
        if self.kind == "memory":
            started: list[Any] = [thread_beat(self.make_app(), "--catch-up" in args) for _ in range(count)]
            self.running += started
            return started
        return self._processes(count, ["beat", APP_SPEC, *args], "beat ready")

    def _processes(self, count: int, args: list[str], ready: str, wait: bool = True) -> list[OffloadProcess]:
        env = env_for(self.url, self.namespace, self.results, FLOWS_DIR=str(self.dir))
        procs = [OffloadProcess(args, env, ready_line=None) for _ in range(count)]
        for p in procs:
            p.ready_line = ready  # type: ignore[attr-defined]
        self.running += procs  # stopped at the end even if one never becomes ready
        if wait:
            self.ready(procs)
        return procs

    def ready(self, runners: list[Any]) -> None:
        """Wait until processes started with ``wait=False`` say they are ready."""
        for r in runners:
            if isinstance(r, OffloadProcess):
                r.wait_for(r.ready_line, timeout=30)  # type: ignore[attr-defined]

    def stop(self, runners: list[Any]) -> None:
        """Stop these workers or beats gracefully, side by side."""
        for r in runners:
            r.terminate()
        for r in runners:
            if isinstance(r, OffloadProcess):
                try:
                    r.wait(35)
                except subprocess.TimeoutExpired:
                    r.kill()
            else:
                r.join()
            if r in self.running:
                self.running.remove(r)

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.app._portal.run(coro)

    def close(self) -> None:
        self.stop(list(self.running))
        self.run(flush_namespace(self.app))
        self.app.close()


@contextmanager
def open_harness(kind: str, tmp_path: Path, namespace: str) -> Iterator[Harness]:
    """A harness whose workers and beats are stopped, and namespace flushed, at the end."""
    h = Harness(kind, tmp_path, namespace)
    try:
        with pytest.MonkeyPatch.context() as mp:
            # Tasks leave their traces in FLOWS_DIR: worker processes get it in their
            # environment, memory://'s in-process workers read it from this one.
            mp.setenv("FLOWS_DIR", str(h.dir))
            yield h
    finally:
        h.close()


@pytest.fixture
def harness(kind: str, tmp_path: Path, namespace: str) -> Iterator[Harness]:
    with open_harness(kind, tmp_path, namespace) as h:
        yield h


@pytest.fixture(scope="module", params=KINDS)
def shared(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    """One harness and two workers per kind for a whole module, for tests that only send work
    and wait for it: starting worker processes per test would dominate their running time."""
    require_server(request.param)
    with open_harness(request.param, tmp_path_factory.mktemp(request.param), f"t{uuid.uuid4().hex[:12]}") as h:
        h.workers(2, "-c", "8")
        yield h
