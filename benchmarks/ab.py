"""Two checkouts of offload side by side: drain rate, worker CPU per task and round-trip p50,
alternating between them so that load elsewhere on the machine weighs on both alike.

    git worktree add /tmp/before HEAD~1
    python benchmarks/ab.py /tmp/before                       # redis by default
    python benchmarks/ab.py /tmp/before --url sqlite:////tmp/ab.db --rounds 5

Each measurement runs in a fresh process that imports offload from the checkout's ``src``; the
worker is started the same way. Drain: N no-op tasks enqueued, then one `--burst` worker with
``-c 2``; the rate from the stored states (first start to last finish) and the worker's CPU time
from ``wait4``. Round trip: a warm worker, then ``delay().get()`` R times in a row: the median.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure(src: Path, url: str, n: int, round_trips: int) -> tuple[float, float, float]:
    """In this process, with offload imported from ``src``: (drain /s, CPU ms per task, p50 ms)."""
    sys.path[:0] = [str(src), str(ROOT)]
    os.environ.update(OFFLOAD_URL=url, OFFLOAD_NAMESPACE=f"ab{uuid.uuid4().hex[:8]}")
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{ROOT}"}
    argv = [sys.executable, "-m", "offload", "worker", "benchmarks.bench_app:app", "-c", "2", "--log-level", "warning"]
    from benchmarks.bench_app import app, echo, flush, noop

    async def enqueue() -> list[str]:
        return [(await noop.adelay()).id for _ in range(n)]

    ids = app._portal.run(enqueue())
    worker = subprocess.Popen([*argv, "--burst"], env=env, cwd=ROOT)
    _, _, usage = os.wait4(worker.pid, 0)
    states = [s for s in app._portal.run(app._read_states(ids)) if s is not None]
    first = min(s.started_at for s in states if s.started_at)
    last = max(s.finished_at for s in states if s.finished_at)
    drain = n / (last - first).total_seconds()
    cpu_ms = (usage.ru_utime + usage.ru_stime) / n * 1000

    worker = subprocess.Popen(argv, env=env, cwd=ROOT)
    try:
        echo.delay(0).get(timeout=60)
        took = []
        for i in range(round_trips):
            t0 = time.perf_counter()
            echo.delay(i).get(timeout=10)
            took.append((time.perf_counter() - t0) * 1000)
    finally:
        worker.kill()
        worker.wait()
        flush(app)
    app.close()
    return drain, cpu_ms, statistics.median(took)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("other", type=Path, help="the other checkout (a directory with src/offload)")
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("-n", type=int, default=5000, help="tasks in each drain")
    parser.add_argument("--round-trips", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure is not None:
        print(*measure(args.measure, args.url, args.n, args.round_trips))
        return
    checkouts = {"other": args.other.resolve() / "src", "this": ROOT / "src"}
    for name, src in checkouts.items():
        if not (src / "offload" / "__init__.py").exists():
            sys.exit(f"ab: error: no src/offload in the {name} checkout ({src.parent})")
    results: dict[str, list[tuple[float, ...]]] = {name: [] for name in checkouts}
    for round_no in range(1, args.rounds + 1):
        for name, src in checkouts.items():
            out = subprocess.run(
                [sys.executable, __file__, str(args.other), "--measure", str(src), "--url", args.url, "-n", str(args.n),
                 "--round-trips", str(args.round_trips)],
                cwd=ROOT, check=True, capture_output=True, text=True,
            ).stdout.split()
            figures = tuple(float(x) for x in out[-3:])
            results[name].append(figures)
            print(f"round {round_no} {name:5}  drain {figures[0]:7.0f}/s  CPU {figures[1]:.3f} ms/task  p50 {figures[2]:.3f} ms",
                  flush=True)
    print(f"\nmedians over {args.rounds} rounds ({args.url}; load average now {os.getloadavg()[0]:.2f}):")
    for name, rows in results.items():
        drain, cpu, p50 = (statistics.median(col) for col in zip(*rows, strict=True))
        print(f"  {name:5}  drain {drain:7.0f}/s  CPU {cpu:.3f} ms/task  p50 {p50:.3f} ms")


if __name__ == "__main__":
    main()
