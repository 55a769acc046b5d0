"""The app the conformance suite runs in real worker processes. Its broker comes from the
environment: OFFLOAD_URL, OFFLOAD_NAMESPACE and (for amqp) OFFLOAD_TEST_RESULTS."""

from __future__ import annotations

import asyncio
import gc
import os
import time
from pathlib import Path

from offload import Offload, Retry, current

app = Offload(results=os.environ.get("OFFLOAD_TEST_RESULTS") or None, secret=os.environ.get("OFFLOAD_TEST_SECRET") or None,
              serializer=os.environ.get("OFFLOAD_TEST_SERIALIZER") or "json")


@app.on_worker_start
def open_resources() -> None:
    current.state["pid"] = os.getpid()
    current.state["started"] = current.state.get("started", 0) + 1


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
def noop() -> None:
    return None


@app.task
async def async_add(x: int, y: int) -> int:
    await asyncio.sleep(0)
    return x + y


@app.task
def frozen_objects() -> int:
    """How many objects the garbage collector skips in the process that runs the task."""
    return gc.get_freeze_count()


@app.task
async def loop_kind() -> str:
    """What the worker's event loop is: uvloop or asyncio."""
    from offload.loops import loop_kind

    return loop_kind(asyncio.get_running_loop())


@app.task
def worker_pid() -> int:
    return current.state["pid"]


@app.task
def record(path: str, token: str, seconds: float = 0.0) -> str:
    """Append a line per execution, so tests can count how often each task really ran."""
    if seconds:
        time.sleep(seconds)
    with open(path, "a") as f:
        f.write(f"{token}\n")
    return token


@app.task
def touch_then_sleep(marker: str, seconds: float) -> str:
    Path(marker).write_text(str(os.getpid()))
    time.sleep(seconds)
    return "slept"


@app.task
def touch_then_report(marker: str, seconds: float) -> str:
    """A thread task that reports progress as it goes: each report is a chance to be cancelled."""
    Path(marker).write_text(str(os.getpid()))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        current.progress(None, "working")
        time.sleep(0.01)
    Path(marker + ".finished").write_text("ran to the end")
    return "reported"


@app.task
async def async_touch_then_sleep(marker: str, seconds: float) -> str:
    Path(marker).write_text(str(os.getpid()))
    await asyncio.sleep(seconds)
    return "slept"


@app.task
def hang(marker: str) -> None:
    Path(marker).write_text(str(os.getpid()))
    while True:  # a busy loop that never ends: only a time limit stops it
        time.sleep(0.01)


@app.task
def progress_steps(steps: int, pause: float = 0.05) -> int:
    for i in range(steps):
        current.progress((i + 1) / steps, f"step {i + 1} of {steps}", force=True)
        time.sleep(pause)
    return steps


@app.task
def count_rows(rows: int, fail_at: int | None = None) -> int:
    """An export's loop: a progress() call per row, far more often than the throttle writes."""
    for i in range(rows):
        if i == fail_at:
            raise ValueError(f"row {i} is unreadable")
        current.progress((i + 1) / rows, f"{i + 1} of {rows} rows")
    return rows


@app.task
async def acount_rows(rows: int) -> int:
    for i in range(rows):
        current.progress((i + 1) / rows, f"{i + 1} of {rows} rows")
    return rows


@app.task(retries=3, retry_backoff=0.05)
def flaky(path: str, fail_times: int) -> int:
    with open(path, "a") as f:
        f.write("x\n")
    if current.attempt <= fail_times:
        raise ConnectionError(f"attempt {current.attempt} failed")
    return current.attempt


@app.task(retries=2)
def asks_retry(path: str) -> int:
    with open(path, "a") as f:
        f.write("x\n")
    if current.attempt < 3:
        raise Retry(countdown=0.05)
    return current.attempt


@app.task(retries=1)
def retries_once(countdown: float | None) -> int:
    """Fails its first attempt, asking a retry in ``countdown`` seconds (None: the default
    backoff, about 0.5 to 1 s), then returns its attempt."""
    if current.attempt == 1:
        if countdown is None:
            raise ConnectionError("first attempt fails")
        raise Retry(countdown=countdown)
    return current.attempt


@app.task
def fail(message: str) -> None:
    raise ValueError(message)


@app.task
def soft_limited(marker: str) -> str:
    try:
        Path(marker).write_text("started")
        for _ in range(3000):  # work in steps, as real tasks do: a thread can be interrupted between them
            time.sleep(0.01)
    except Exception as e:  # SoftTimeLimitExceeded: clean up, then say so
        return f"cleaned up after {type(e).__name__}"
    return "not interrupted"


@app.task
def publish_to(channel: str, data: str) -> None:
    current.publish(channel, {"data": data})


@app.task
def whoami() -> dict[str, object]:
    return {"id": current.id, "attempt": current.attempt}


@app.task
def hold(marker_dir: str, seconds: float) -> int:
    """Mark each run (a file named by task id and pid), hold a place, and say which process ran it."""
    Path(marker_dir, f"{current.id}.{os.getpid()}").touch()
    time.sleep(seconds)
    return os.getpid()
