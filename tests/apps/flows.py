"""The app behind the workflow, pub/sub, periodic and rate-limit tests, run in real worker and
beat processes. Its broker comes from the environment: OFFLOAD_URL, OFFLOAD_NAMESPACE and (for
amqp) OFFLOAD_TEST_RESULTS. FLOWS_DIR names a directory where tasks leave their traces."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from offload import Offload, current, every

app = Offload(results=os.environ.get("OFFLOAD_TEST_RESULTS") or None)


def _trace(name: str, line: str) -> None:
    directory = os.environ.get("FLOWS_DIR")
    if directory:
        with open(Path(directory) / name, "a") as f:
            f.write(line + "\n")


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
def total(values: list[int]) -> int:
    return sum(values)


@app.task
def fail(message: str) -> None:
    raise ValueError(message)


@app.task
async def fail_after(seconds: float, message: str) -> None:
    await asyncio.sleep(seconds)
    raise ValueError(message)


@app.task
async def slow(seconds: float, value: Any, marker: str) -> Any:
    """Sleeps, then leaves ``marker`` behind: a cancelled run never does."""
    await asyncio.sleep(seconds)
    Path(marker).write_text("finished")
    return value


@app.task
def fast(value: Any) -> Any:
    return value


@app.task
def headers_of(value: Any) -> dict[str, Any]:
    """The value it was given and the headers this run was sent with."""
    return {"value": value, "headers": dict(current.headers)}


@app.task
async def end_at(at: float, value: Any) -> Any:
    """Ends at the wall-clock time ``at``, so members on different workers end together."""
    await asyncio.sleep(max(at - time.time(), 0.0))
    return value


@app.task
def collect(values: list[Any], path: str) -> list[Any]:
    """A chord callback that records each call, to count them."""
    with open(path, "a") as f:
        f.write(f"{current.id} {values}\n")
    return values


@app.task
async def gate(value: Any, directory: str) -> Any:
    """Says it started, then waits until the test opens the gate (a file appears)."""
    Path(directory, f"started-{os.getpid()}").write_text(current.id)
    while not Path(directory, "open").exists():
        await asyncio.sleep(0.02)
    return value


@app.task(rate_limit="5/s")
def limited(path: str, token: str) -> str:
    with open(path, "a") as f:
        f.write(f"{time.time():.6f} {token}\n")
    return token


@app.task
def publish_to(channel: str, data: Any) -> None:
    current.publish(channel, {"data": data, "task": current.id})


@app.periodic(every(seconds=1))
def tick() -> str:
    _trace("ticks", f"{current.headers['due']} {current.id}")
    return current.headers["due"]


@app.task
async def apublish_to(channel: str, data: Any) -> None:
    current.publish(channel, {"data": data, "task": current.id})


@app.task(retries=2, retry_backoff=0.05)
def fails_once(path: str) -> int:
    """Fails on its first attempt (its own retries=2 must apply, even in a workflow)."""
    with open(path, "a") as f:
        f.write("x\n")
    if current.attempt == 1:
        raise ConnectionError("first attempt fails")
    return current.attempt
