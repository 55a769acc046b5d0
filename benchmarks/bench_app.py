"""Tasks used by the benchmarks. The broker comes from OFFLOAD_URL (and OFFLOAD_BENCH_RESULTS)."""

from __future__ import annotations

import os

from offload import Offload

app = Offload(results=os.environ.get("OFFLOAD_BENCH_RESULTS") or None)


@app.task
def noop() -> None:
    return None


@app.task
def echo(x: int) -> int:
    return x
