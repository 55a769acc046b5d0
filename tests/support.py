"""Real worker processes for tests: start `python -m offload worker ...`, wait until it says it
is ready, stop it with SIGTERM or kill it with SIGKILL."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from offload import admin

if TYPE_CHECKING:
    from offload import Offload

ROOT = Path(__file__).resolve().parent.parent


def env_for(url: str, namespace: str, results: str | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOAD_") or k == "OFFLOAD_REQUIRE_BROKERS"}
    # src first: the worker runs the code under test, not whatever copy is installed.
    pythonpath = os.pathsep.join((str(ROOT / "src"), str(ROOT)))
    env.update({"OFFLOAD_URL": url, "OFFLOAD_NAMESPACE": namespace, "PYTHONPATH": pythonpath, **extra})
    if results:
        env["OFFLOAD_TEST_RESULTS"] = results
    return env


class OffloadProcess:
    """One `python -m offload ...` subprocess whose stderr is collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str], ready_line: str | None, cwd: Path = ROOT) -> None:
        self.args = args
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._eof = False
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "offload", *args], cwd=cwd, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        if ready_line is not None:
            self.wait_for(ready_line, timeout=30)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for(self, text: str | Callable[[str], bool], timeout: float = 30, count: int = 1) -> str:
        """Wait until ``count`` output lines contain ``text`` (or satisfy it); return the last."""
        match = text if callable(text) else (lambda line: text in line)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                hits = [line for line in self.lines if match(line)]
                if len(hits) >= count:
                    return hits[-1]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{text!r} not seen in {timeout} s (exit={self.proc.poll()}); output:\n" + "\n".join(self.lines[-40:]))
                if self.proc.poll() is not None and self._eof:
                    raise AssertionError(f"{text!r} not seen: the process exited with {self.proc.returncode}; output:\n" + "\n".join(self.lines[-40:]))
                self._changed.wait(min(left, 0.5))

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def interrupt(self) -> None:
        self.proc.send_signal(signal.SIGINT)

    def kill(self) -> None:
        """SIGKILL the worker and its children (its whole session): nothing gets to clean up."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def wait(self, timeout: float = 60) -> int:
        """Wait for the exit code, then for the reader to have collected every line written
        before the exit (a test that reads `output` right after must see them all)."""
        deadline = time.monotonic() + timeout
        code = self.proc.wait(timeout)
        with self._changed:
            while not self._eof:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"the process exited with {code} but its output did not end within {timeout} s")
                self._changed.wait(left)
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(35)
            except subprocess.TimeoutExpired:
                self.kill()


def free_port() -> int:
    """A port nothing listens on now (the kernel's pick of a free one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A redis-server of the test's own on a spare port, without persistence: to stop (or kill)
    while offload uses it, and to start again on the same port; with ``password``, it asks for it."""

    def __init__(self, password: str | None = None) -> None:
        from tests.conftest import require_program

        self.program = require_program("redis-server", "apt install redis-server")
        self.port = free_port()
        self.password = password
        self.url = f"redis://{f':{password}@' if password else ''}127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []

    def start(self, timeout: float = 10) -> None:
        """Start it; return once it logs that it accepts connections."""
        self.proc = proc = subprocess.Popen(
            [self.program, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no", *(["--requirepass", self.password] if self.password else [])],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        ready, settled = threading.Event(), threading.Event()  # settled: ready, or its output ended

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                self.lines.append(line.rstrip("\n"))
                if "Ready to accept connections" in line:
                    ready.set()
                    settled.set()
            settled.set()

        threading.Thread(target=read, daemon=True).start()
        settled.wait(timeout)
        if not ready.is_set():
            exited = proc.poll()
            self.kill()
            raise AssertionError(f"redis-server on port {self.port} not ready within {timeout} s (exit={exited}); output:\n"
                                 + "\n".join(self.lines[-20:]))

    def stop(self) -> None:
        """SIGTERM, as an orderly shutdown or a restart does."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def kill(self) -> None:
        """SIGKILL, as a crash does."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


def start_worker(url: str, namespace: str, *args: str, results: str | None = None, app: str = "tests.apps.basic:app",
                 extra_env: dict[str, str] | None = None) -> OffloadProcess:
    return OffloadProcess(["worker", app, *args], env_for(url, namespace, results, **(extra_env or {})), ready_line="worker ready")


def run_cli(url: str, namespace: str, *args: str, results: str | None = None, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "offload", *args], cwd=ROOT, env=env_for(url, namespace, results),
                          capture_output=True, text=True, timeout=timeout, **kw)


def wait_until(predicate: Callable[[], bool], timeout: float = 30, message: str = "condition") -> None:
    """Poll a cheap local condition (a file's contents) until true; for events with no notifier."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} not reached within {timeout} s")
        time.sleep(0.02)


class InThread:
    """A coroutine (a worker's or a beat's run) on its own loop in a daemon thread: how tests run
    workers for memory://, which cannot cross processes."""

    def __init__(self, app: Offload, run: Callable[[], Coroutine[Any, Any, Any]], started: Callable[[], bool],
                 stop: Callable[[], None]) -> None:
        self.app, self._run, self._started, self._stop = app, run, started, stop
        self._ready = threading.Event()
        self.thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)
        self.thread.start()
        assert self._ready.wait(10), "in-process runner did not start"

    async def _main(self) -> None:
        task = asyncio.create_task(self._run())
        while not self._started():  # run() has reached its first await: stop() works now
            await asyncio.sleep(0.001)
        self._ready.set()
        try:
            await task
        finally:
            await self.app.aclose()

    def terminate(self) -> None:
        """Ask it to stop (once: a worker asked twice stops at once, abandoning its tasks)."""
        if self.thread.is_alive():
            self._stop()

    def join(self) -> None:
        self.thread.join(40)

    def stop(self) -> None:
        self.terminate()
        self.join()


def thread_worker(app: Offload, **options: Any) -> InThread:
    from offload.worker import Worker

    w = Worker(app, handle_signals=False, **options)
    runner = InThread(app, w.run, lambda: w._stopping is not None, w.stop)
    runner.worker = w  # type: ignore[attr-defined]
    return runner


def worker_options(args: tuple[str, ...]) -> dict[str, Any]:
    """`offload worker` command-line options as keyword arguments of `Worker`."""
    names = {"-c": "concurrency", "--concurrency": "concurrency", "-q": "queues", "--queues": "queues",
             "--pool": "pool", "--prefetch": "prefetch", "--grace": "grace_s"}
    convert: dict[str, Callable[[str], Any]] = {"concurrency": int, "prefetch": int, "grace_s": float,
                                                 "queues": lambda v: v.split(","), "pool": str}
    opts: dict[str, Any] = {}
    it = iter(args)
    for a in it:
        if a in names:
            opts[names[a]] = convert[names[a]](next(it))
        elif a == "--burst":
            opts["burst"] = True
    return opts


async def flush_namespace(app: Offload) -> None:
    await admin.flush(app)


def enqueue_noops(app: Offload, n: int) -> list[str]:
    """Send ``n`` of tests.apps.basic's no-op task through ``app``; their ids."""
    from tests.apps import basic

    noop = app.task(name="tests.apps.basic.noop")(basic.noop.fn)

    async def enqueue() -> list[str]:
        return [(await noop.adelay()).id for _ in range(n)]

    return app._portal.run(enqueue())


def drain_then_close(app: Offload, ids: list[str], **options: Any) -> None:
    """Run a worker in a thread (`Worker` ``options``) until every task of ``ids`` has ended;
    then empty the namespace and close ``app``."""
    worker = thread_worker(app, **options)
    try:
        for task_id in ids:
            app.result(task_id).get(timeout=30)
    finally:
        worker.stop()
        app._portal.run(flush_namespace(app))
        app.close()
