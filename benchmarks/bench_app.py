"""Tasks used by the benchmarks. The broker comes from OFFLOAD_URL (and OFFLOAD_BENCH_RESULTS)."""

from __future__ import annotations

import os
from typing import Any

from offload import Offload

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

    async def both() -> Any:
        backends = await offload._backends()
        await backends.broker.flush_namespace()
        await backends.store.flush_namespace()

    offload._portal.run(both())
