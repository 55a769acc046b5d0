"""Tasks used by the benchmarks. The broker comes from OFFLOAD_URL (and OFFLOAD_BENCH_RESULTS)."""

from __future__ import annotations

import os

from offload import Offload, admin

app = Offload(results=os.environ.get("OFFLOAD_BENCH_RESULTS") or None)


@app.task
def noop() -> None:
    return None


@app.task
def echo(x: int) -> int:
    return x


def flush(offload: Offload) -> None:
    """Delete the namespace's queues, messages and states, in the broker and the result store:
    a benchmark leaves nothing behind in the servers it borrowed."""

    offload._portal.run(admin.flush(offload))
