"""Tasks used by the benchmarks. The broker comes from OFFLOAD_URL (and OFFLOAD_BENCH_RESULTS)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from offload import Offload, admin, current

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


@app.task
def hold(marker_dir: str, seconds: float) -> int:
    """Mark this start (task id and pid, one file per run), then hold a place for ``seconds``."""
    Path(marker_dir, f"{current.id}.{os.getpid()}").touch()
    time.sleep(seconds)
    return os.getpid()
