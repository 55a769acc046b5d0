"""The app of the gateway load benchmark. The broker comes from OFFLOAD_URL and OFFLOAD_NAMESPACE."""

from __future__ import annotations

from offload import Offload

app = Offload()


@app.task
async def finish(i: int) -> int:
    return i
