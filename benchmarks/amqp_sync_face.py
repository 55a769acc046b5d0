"""What the sync face's own AMQP client buys: `task.delay()` on ``amqp://`` (results on Redis)
from a plain thread, sent by py-amqp from that thread (`offload.brokers.amqp.direct`), against
the same calls with that sender switched off (``?sync_connections=0``, the URL parameter that
turns it off, tested in tests/brokers/test_amqp_direct.py), so that each `delay()` hops to the
app's event loop thread and is sent there by aio-pika, the enqueue and the QUEUED state's write
together, as an app without the sync face's client would.

    python benchmarks/amqp_sync_face.py        # -n 3000 --rounds 3
    python benchmarks/amqp_sync_face.py --amqp amqp://guest:guest@127.0.0.1:5672/ --results redis://127.0.0.1:6379/0

Each round runs both ways, in turn, each in a fresh app and namespace: 50 calls for warm-up
(the first declares the queue and opens the connections), then ``-n`` calls one after another
from one thread, each timed. No worker runs: the figure is the call, which returns once
RabbitMQ has confirmed the message and the QUEUED state is stored. Reported per run: calls per
second, the p50 and p99 of one call, and the CPU time of the calling process (all its threads,
the loop's included) per call, which moves less than the rest when other work shares the
machine; then, per way, the medians of the runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from benchmarks.bench_app import flush  # noqa: E402
from benchmarks.core import percentile  # noqa: E402
from offload import Offload  # noqa: E402

WARM_UP = 50
WAYS = {"py-amqp, caller's thread": "", "aio-pika, through the loop": "sync_connections=0"}


def noop() -> None:
    return None


def run(amqp_url: str, results: str, param: str, n: int) -> tuple[float, float, float, float]:
    """(calls per second, p50 ms, p99 ms, CPU ms per call) of ``n`` delay() calls from a thread
    of their own."""
    url = amqp_url + (("&" if "?" in amqp_url else "?") + param if param else "")
    app = Offload(url, namespace=f"syncface{uuid.uuid4().hex[:8]}", results=results)
    task = app.task(name="benchmarks.amqp_sync_face.noop")(noop)
    latencies: list[float] = []
    elapsed: list[float] = []
    cpu: list[float] = []

    def calls() -> None:
        for _ in range(WARM_UP):
            task.delay()
        started, cpu_started = time.perf_counter(), time.process_time()
        for _ in range(n):
            t0 = time.perf_counter()
            task.delay()
            latencies.append((time.perf_counter() - t0) * 1000)
        elapsed.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)

    try:
        caller = threading.Thread(target=calls)
        caller.start()
        caller.join()
    finally:
        flush(app)
        app.close()
    return n / elapsed[0], statistics.median(latencies), percentile(latencies, 0.99), cpu[0] * 1000 / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--results", default="redis://127.0.0.1:6379/0")
    parser.add_argument("-n", type=int, default=3000, help="timed delay() calls per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each way, in turn")
    args = parser.parse_args()
    figures: dict[str, list[tuple[float, float, float, float]]] = {way: [] for way in WAYS}
    print(f"{'way':28} {'round':>5} {'calls/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'CPU ms':>8}")
    for round_ in range(1, args.rounds + 1):
        for way, param in WAYS.items():
            figure = run(args.amqp, args.results, param, args.n)
            figures[way].append(figure)
            rate, p50, p99, cpu_ms = figure
            print(f"{way:28} {round_:5} {rate:9.0f} {p50:8.3f} {p99:8.3f} {cpu_ms:8.3f}", flush=True)
    print(f"\nmedians of {args.rounds} runs of {args.n} calls")
    medians = {way: [statistics.median(run[i] for run in runs) for i in range(4)] for way, runs in figures.items()}
    for way, (rate, p50, p99, cpu_ms) in medians.items():
        print(f"{way:28} {'':5} {rate:9.0f} {p50:8.3f} {p99:8.3f} {cpu_ms:8.3f}")
    (direct_rate, direct_p50, direct_p99, direct_cpu), (loop_rate, loop_p50, loop_p99, loop_cpu) = medians.values()
    print(
        f"py-amqp's gain: {direct_rate / loop_rate:.2f}x the calls per second, p50 {loop_p50 / direct_p50:.2f}x "
        f"shorter, p99 {loop_p99 / direct_p99:.2f}x shorter, {loop_cpu / direct_cpu:.2f}x less CPU per call"
    )


if __name__ == "__main__":
    main()
