"""Where one round trip's time goes: timestamps at each stage of ``echo.delay(i).get()``,
in the caller and in the worker, as medians over many round trips.

    python benchmarks/timeline.py                                  # redis
    python benchmarks/timeline.py --url amqp://guest:guest@127.0.0.1:5672/ --results redis://127.0.0.1:6379/0
    python benchmarks/timeline.py --src /tmp/before/src            # another checkout

Probes wrap a few methods of offload (named in PROBES) in the caller and in a worker started
with the same probes; each records the wall clock on entry and on exit, keyed by task id. The
report gives, per stage, the median time after ``delay()`` was called. A probe costs a few
microseconds, so the total runs a little slower than an untraced round trip (printed too).
Probes whose method a checkout does not have are skipped.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import functools
import importlib
import inspect
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# (module, class, method, label, which argument holds the task id or ids)
IdOf = Callable[[tuple[Any, ...]], list[str]]


def _first_message(args: tuple[Any, ...]) -> list[str]:
    return [args[0].id]


def _state_ids(args: tuple[Any, ...]) -> list[str]:
    return [task_id for task_id, _ in args[0]]


def _settled_ids(args: tuple[Any, ...]) -> list[str]:
    return [task_id for task_id, _ in args[1]]


def _job_id(args: tuple[Any, ...]) -> list[str]:
    return [args[0].env.id]


def _held_id(args: tuple[Any, ...]) -> list[str]:
    return [args[0].delivery.id]


def _ids(args: tuple[Any, ...]) -> list[str]:
    return list(args[0])


PROBES: list[tuple[str, str, str, str, IdOf]] = [
    ("offload.brokers.redis.store", "RedisStore", "put_states", "store states", _state_ids),
    ("offload.brokers.redis.store", "RedisStore", "put_states_if_absent", "store QUEUED if absent", _state_ids),
    ("offload.brokers.amqp", "AmqpBroker", "enqueue", "amqp enqueue", _first_message),
    ("offload.brokers.amqp.records", "Records", "claim", "amqp claim", _ids),
    # The amqp rows in checkouts from before the amqp broker was a package.
    ("offload.brokers.amqp_direct", "AmqpDirect", "enqueue", "amqp enqueue from the caller's thread", _first_message),
    ("offload.brokers.amqp", "AmqpBroker", "_claim", "amqp claim", _ids),
    ("offload.worker.pipeline", "Pipeline", "_admitted", "verdict awaited", _held_id),
    ("offload.brokers.base", "Broker", "store_and_ack", "store and ack", _settled_ids),
    ("offload.brokers.redis.broker", "RedisBroker", "store_and_ack", "store and ack", _settled_ids),
    ("offload.worker.executors", "ThreadRunner", "run", "task in its thread", _job_id),
]

AMQP_ARRIVALS = [("offload.brokers.amqp.consumer", "Consumer", "on_message"), ("offload.brokers.amqp", "AmqpBroker", "_on_message")]


class Recorder:
    """Events kept in memory and written out in blocks, and at exit: a write per event would put a
    system call (tens of microseconds on a small virtual machine) on the very paths being timed,
    and made the claim look four times as slow as it is."""

    BLOCK = 8192

    def __init__(self, path: Path, role: str) -> None:
        self._path = path
        self.role = role
        self._events: list[tuple[float, str, str]] = []
        atexit.register(self.flush)

    def event(self, label: str, task_ids: list[str], at: float | None = None) -> None:
        stamp = time.time() if at is None else at
        for task_id in task_ids:
            self._events.append((stamp, label, task_id))
        if len(self._events) >= self.BLOCK:
            self.flush()

    def flush(self) -> None:
        events, self._events = self._events, []
        if not events:  # nothing since the last flush: at exit, the caller's file is gone already
            return
        with self._path.open("a") as out:
            out.writelines(f"{stamp:.6f}\t{self.role}\t{label}\t{task_id}\n" for stamp, label, task_id in events)

    def wrap(self, owner: type, name: str, label: str, id_of: IdOf) -> None:
        original = owner.__dict__.get(name)
        if original is None:
            return
        record = self.event

        if inspect.iscoroutinefunction(original):

            @functools.wraps(original)
            async def traced_async(this: Any, *args: Any, **kwargs: Any) -> Any:
                ids = id_of(args)
                record(f"{label} >", ids)
                try:
                    return await original(this, *args, **kwargs)
                finally:
                    record(f"{label} <", ids)

            setattr(owner, name, traced_async)
        else:

            @functools.wraps(original)
            def traced(this: Any, *args: Any, **kwargs: Any) -> Any:
                ids = id_of(args)
                record(f"{label} >", ids)
                try:
                    return original(this, *args, **kwargs)
                finally:
                    record(f"{label} <", ids)

            setattr(owner, name, traced)

    def install(self) -> None:
        for module_name, class_name, method, label, id_of in PROBES:
            try:
                owner = getattr(importlib.import_module(module_name), class_name)
            except (ImportError, AttributeError):
                continue
            self.wrap(owner, method, label, id_of)
        self._install_arrivals()

    def _install_arrivals(self) -> None:
        """The moments a message reaches the worker and leaves its broker's fetch."""
        from offload.brokers.base import Broker

        record = self.event
        for broker_class in Broker.__subclasses__():
            fetch = broker_class.__dict__.get("fetch")
            if fetch is None:
                continue

            def make(original: Any) -> Any:
                @functools.wraps(original)
                async def traced_fetch(this: Any, *args: Any, **kwargs: Any) -> Any:
                    got = await original(this, *args, **kwargs)
                    record("fetch returned", [d.id for d in got])
                    return got

                return traced_fetch

            broker_class.fetch = make(fetch)  # type: ignore[method-assign]
        # The amqp consumer's callback: the package's Consumer, or (in checkouts from before the
        # package) the broker's own method.
        for module_name, class_name, method in AMQP_ARRIVALS:
            try:
                owner = getattr(importlib.import_module(module_name), class_name)
            except (ImportError, AttributeError):
                continue
            on_message = owner.__dict__.get(method)
            if on_message is None:
                continue

            def arrived(this: Any, queue: str, message: Any, on_message: Any = on_message) -> Any:
                record("amqp delivery arrived", [str((message.headers or {}).get("offload-id"))])
                # A coroutine function in checkouts from before consumers were aiormq's own.
                return on_message(this, queue, message)

            setattr(owner, method, functools.wraps(on_message)(arrived))
            return


def run_worker(trace: Path) -> None:
    """The worker process: probes installed, then offload's command line as usual."""
    recorder = Recorder(trace, "worker")
    recorder.install()
    from offload.cli import main

    # `offload worker` ends with os._exit (threads stuck in C code must not hold the exit), which
    # skips atexit: write the events first.
    exit_now = os._exit

    def flush_then_exit(code: int) -> None:
        recorder.flush()
        exit_now(code)

    os._exit = flush_then_exit  # type: ignore[assignment]

    sys.argv = ["offload", *sys.argv[sys.argv.index("--") + 1 :]]
    main()


def run_caller(args: argparse.Namespace) -> None:
    trace = Path(tempfile.mkstemp(prefix="offload-timeline-", suffix=".tsv")[1])
    src = str(Path(args.src).resolve())
    sys.path[:0] = [src, str(ROOT)]
    os.environ.update(OFFLOAD_URL=args.url, OFFLOAD_NAMESPACE=f"timeline{uuid.uuid4().hex[:8]}")
    if args.results:
        os.environ["OFFLOAD_BENCH_RESULTS"] = args.results
    recorder = Recorder(trace, "caller")
    recorder.install()
    from benchmarks.bench_app import app, echo, flush
    from offload import result as result_module
    from offload.sending import Sender

    def traced_send(original: Any) -> Any:
        @functools.wraps(original)
        def send(self: Any, *a: Any, **k: Any) -> Any:
            started = time.time()
            handle = original(self, *a, **k)
            recorder.event("delay() called", [handle.id], at=started)
            recorder.event("delay() returned", [handle.id])
            return handle

        return send

    def traced_get(original: Any) -> Any:
        @functools.wraps(original)
        def get(self: Any, *a: Any, **k: Any) -> Any:
            value = original(self, *a, **k)
            recorder.event("get() returned", [self.id])
            return value

        return get

    Sender.send_sync = traced_send(Sender.send_sync)  # type: ignore[method-assign]
    result_module.Result.get = traced_get(result_module.Result.get)  # type: ignore[method-assign]

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, str(ROOT)])}
    # The worker's events go to a file of its own, written when it stops (see Recorder).
    worker_trace = trace.with_suffix(".worker.tsv")
    argv = [sys.executable, __file__, "--worker-trace", str(worker_trace), "--", "worker", "benchmarks.bench_app:app",
            "-c", "2", "--log-level", "warning"]  # fmt: skip
    worker = subprocess.Popen(argv, env=env, cwd=ROOT)
    untraced: list[float] = []
    try:
        echo.delay(0).get(timeout=60)
        for i in range(50):
            echo.delay(i).get(timeout=10)
        started_at = time.time()
        for i in range(args.round_trips):
            t0 = time.perf_counter()
            echo.delay(i).get(timeout=10)
            untraced.append((time.perf_counter() - t0) * 1000)
    finally:
        worker.terminate()  # a warm stop, so that it writes its events at exit
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        flush(app)
        app.close()
    recorder.flush()
    report([trace, worker_trace], started_at, untraced)
    for path in (trace, worker_trace):
        path.unlink(missing_ok=True)


def report(traces: list[Path], since: float, round_trips_ms: list[float]) -> None:
    by_task: dict[str, dict[str, float]] = collections.defaultdict(dict)
    for trace in traces:
        if not trace.exists():
            print(f"no events in {trace.name}: that process did not stop cleanly", file=sys.stderr)
            continue
        with trace.open() as lines:
            for line in lines:
                stamp, role, label, task_id = line.rstrip("\n").split("\t")
                if float(stamp) >= since:
                    by_task[task_id].setdefault(f"{role}: {label}", float(stamp))
    offsets: dict[str, list[float]] = collections.defaultdict(list)
    for events in by_task.values():
        start = events.get("caller: delay() called")
        if start is None or "caller: get() returned" not in events:
            continue
        for name, stamp in events.items():
            offsets[name].append((stamp - start) * 1000)
    rows = sorted(((statistics.median(v), name, len(v)) for name, v in offsets.items()), key=lambda r: r[0])
    print(f"round trip p50 {statistics.median(round_trips_ms):.2f} ms (traced), {len(round_trips_ms)} round trips")
    print(f"{'ms after delay()':>17}  stage")
    for median, name, count in rows:
        print(f"{median:17.3f}  {name}" + (f"  (in {count})" if count < len(round_trips_ms) else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0", help="the broker")
    parser.add_argument("--results", help="the result store, for amqp://")
    parser.add_argument("--src", default=str(ROOT / "src"), help="the checkout's src directory to measure")
    parser.add_argument("--round-trips", type=int, default=300)
    parser.add_argument("--worker-trace", type=Path, help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args()
    if args.worker_trace is not None:
        run_worker(args.worker_trace)
        return
    run_caller(args)


if __name__ == "__main__":
    main()
