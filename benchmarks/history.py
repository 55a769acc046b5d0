"""How long `app.tasks()` takes with 100,000 stored states: the states are written through the
store as workers write them (QUEUED, then a final state; one in ten failed, names and queues
spread over a few), then each listing is timed (median of the runs, milliseconds per call).

    python benchmarks/history.py                   # sqlite and redis
    python benchmarks/history.py --brokers redis --states 20000
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from offload import Offload, Status  # noqa: E402
from offload.result import TaskState  # noqa: E402

BROKERS = {"sqlite": "sqlite:///{tmp}/offload.db", "redis": "redis://127.0.0.1:6379/0"}
NAMES = [f"shop.tasks.job{i}" for i in range(8)]
QUEUES = ["default", "images", "exports", "mail"]
LISTINGS = {
    "newest 100": {},
    "failed, newest 100": {"status": "failed"},
    "one name, newest 100": {"name": NAMES[3]},
    "failed of one queue, newest 100": {"status": "failed", "queue": "exports"},
    "a page deep (before=, 100)": {"before": "middle"},
}


async def fill(app: Offload, n: int) -> float:
    start, base = time.perf_counter(), time.time() - n / 1000
    batch: list[TaskState] = []
    for i in range(n):
        at = dt.datetime.fromtimestamp(base + i / 1000, dt.UTC)
        status = Status.FAILED if i % 10 == 0 else Status.SUCCEEDED
        batch.append(TaskState(id=uuid.uuid4().hex, name=NAMES[i % len(NAMES)], status=status,
                               queue=QUEUES[i % len(QUEUES)], queued_at=at, finished_at=at))
        if len(batch) == 500:
            await app._write_states(batch)
            batch = []
    if batch:
        await app._write_states(batch)
    return time.perf_counter() - start


async def measure(kind: str, n: int, runs: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        app = Offload(BROKERS[kind].format(tmp=tmp), namespace=f"bench{uuid.uuid4().hex[:8]}")
        try:
            filled = await fill(app, n)
            print(f"{kind}: wrote {n:,} states in {filled:.1f} s", flush=True)
            middle = (await app.atasks(limit=n // 2 if n // 2 <= 10_000 else 10_000))[-1].queued_at
            out: dict[str, float] = {}
            for label, kwargs in LISTINGS.items():
                args = {k: (middle if v == "middle" else v) for k, v in kwargs.items()}
                times = []
                for _ in range(runs):
                    t = time.perf_counter()
                    got = await app.atasks(**args)  # type: ignore[arg-type]
                    times.append((time.perf_counter() - t) * 1000)
                    assert len(got) == 100, (label, len(got))
                out[label] = statistics.median(times)
            return out
        finally:
            await (await app._store()).flush_namespace()
            await app.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--brokers", default="sqlite,redis")
    parser.add_argument("--states", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    for kind in args.brokers.split(","):
        for label, ms in asyncio.run(measure(kind, args.states, args.runs)).items():
            print(f"  {kind:7} {label:34} {ms:7.2f} ms")


if __name__ == "__main__":
    main()
