"""offload's own speed: enqueue rate, drain rate with one worker (-c 2), round-trip latency,
alone and with several processes sending at once.

    python benchmarks/core.py                       # sqlite (the default broker)
    python benchmarks/core.py --url redis://127.0.0.1:6379/0
    python benchmarks/core.py --url amqp://guest:guest@127.0.0.1:5672/ --results redis://127.0.0.1:6379/0

Drain rate is measured from the stored states (first start to last finish), so worker start-up
is not counted. Round trip: delay() then get(), one after another, with a worker waiting.
Concurrent senders: ``--senders`` spawned processes (4, like a pre-forking web server's
workers) each make round trips in lock-step with the others, so their messages reach the broker
together; the p99 shows whether any of them waits for something other than the task.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def worker(url: str, ns: str, results: str | None, *args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OFFLOAD_URL": url, "OFFLOAD_NAMESPACE": ns, "PYTHONPATH": str(ROOT)}
    if results:
        env["OFFLOAD_BENCH_RESULTS"] = results
    return subprocess.Popen([sys.executable, "-m", "offload", "worker", "benchmarks.bench_app:app", "--log-level", "warning", *args], env=env, cwd=ROOT)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * p), len(ordered) - 1)]


def lock_step_sender(barrier: Any, rounds: int, out: Any) -> None:
    """One of the concurrent senders: a round trip each time every sender is ready."""
    from benchmarks.bench_app import app, echo

    echo.delay(0).get(timeout=60)
    latencies = []
    for i in range(rounds):
        barrier.wait(timeout=60)
        t0 = time.perf_counter()
        assert echo.delay(i).get(timeout=10) == i
        latencies.append((time.perf_counter() - t0) * 1000)
    app.close()
    out.put(latencies)


def concurrent_round_trips(senders: int, rounds: int) -> list[float]:
    """Round-trip latencies (ms) of ``senders`` spawned processes sending in lock-step."""
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(senders), ctx.Queue()
    procs = [ctx.Process(target=lock_step_sender, args=(barrier, rounds, out)) for _ in range(senders)]
    for proc in procs:
        proc.start()
    latencies = [ms for _ in procs for ms in out.get(timeout=600)]
    for proc in procs:
        proc.join(30)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url")
    parser.add_argument("--results")
    parser.add_argument("-n", type=int, default=5000, help="tasks for the enqueue and drain runs")
    parser.add_argument("--round-trips", type=int, default=500)
    parser.add_argument("--senders", type=int, default=4, help="processes sending at once, for the concurrent p99")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="offload-bench-")
    url = args.url or f"sqlite:///{tmp}/bench.db"
    ns = f"bench{uuid.uuid4().hex[:8]}"
    os.environ["OFFLOAD_URL"], os.environ["OFFLOAD_NAMESPACE"] = url, ns
    if args.results:
        os.environ["OFFLOAD_BENCH_RESULTS"] = args.results
    from benchmarks.bench_app import app, echo, flush, noop

    async def enqueue_all() -> list[str]:
        return [(await noop.adelay()).id for _ in range(args.n)]

    started = time.perf_counter()
    ids = app._portal.run(enqueue_all())
    enqueue_s = time.perf_counter() - started
    w = worker(url, ns, args.results, "-c", "2", "--burst")
    try:
        app._portal.run(app.result(ids[-1]).wait(timeout=600))
        for i in ids[:: max(len(ids) // 50, 1)]:
            app.result(i).get(timeout=60)
        w.wait(60)
    finally:
        w.kill()
    states = app._portal.run(app._read_states(ids))
    first = min(s.started_at for s in states if s and s.started_at)  # type: ignore[type-var]
    last = max(s.finished_at for s in states if s and s.finished_at)  # type: ignore[type-var]
    drain_s = (last - first).total_seconds()

    w = worker(url, ns, args.results, "-c", "2")
    try:
        echo.delay(0).get(timeout=60)  # the worker is up and warm
        latencies = []
        for i in range(args.round_trips):
            t0 = time.perf_counter()
            assert echo.delay(i).get(timeout=10) == i
            latencies.append((time.perf_counter() - t0) * 1000)
        os.environ["PYTHONPATH"] = str(ROOT)  # for the spawned senders
        concurrent = concurrent_round_trips(args.senders, args.round_trips // args.senders)
    finally:
        w.terminate()
        w.wait(30)
        flush(app)
    app.close()
    print(f"broker          {app.url.masked}")
    print(f"enqueue         {args.n / enqueue_s:8.0f} tasks/s  ({args.n} tasks, one producer, delay() in a loop)")
    print(f"drain (-c 2)    {args.n / drain_s:8.0f} tasks/s  ({args.n} no-op tasks, one worker process)")
    print(f"round trip p50  {statistics.median(latencies):8.2f} ms")
    print(f"round trip p99  {percentile(latencies, 0.99):8.2f} ms  ({args.round_trips} delay()+get() in a row)")
    print(f"concurrent p50  {statistics.median(concurrent):8.2f} ms")
    print(f"concurrent p99  {percentile(concurrent, 0.99):8.2f} ms  ({len(concurrent)} round trips, {args.senders} processes in lock-step)")
    print(f"concurrent max  {max(concurrent):8.2f} ms")


if __name__ == "__main__":
    main()
