"""One gateway process holding thousands of waiting browsers, then every task ends at once.

    python benchmarks/gateway_load.py                  # sqlite, then redis
    python benchmarks/gateway_load.py --kind redis --polls 2000 --streams 2000

Steps, per broker kind:

1. enqueue one pending task per client (no worker runs yet);
2. start ``offload gateway`` and open ``--polls`` long polls (``?wait=60``) and ``--streams``
   SSE streams, one per task, until the gateway's /metrics counts them all as waiting;
3. leave them waiting for ``--idle`` seconds, measuring the gateway's CPU time;
4. start one worker (``--end direct``: write the final states from here, 500 at a time):
   every task ends within a few seconds; each client records when its answer (the long
   poll's final state, the stream's ``done`` event) arrived.

Reported: time from the last task's end (its stored ``finished_at``) until every client had
its answer, per-client lag (answer time minus its own task's end), the gateway's peak RSS
(VmHWM) and its CPU while clients only waited. Targets: every answer within 2 s of the last
task's end, peak RSS under 300 MB. The clients are plain asyncio connections in this process
(a few lines of HTTP/1.1 each, far cheaper than a full HTTP client, so that they do not weigh
on the measurement); /metrics is read with httpx. On a small machine they still share the CPU
with the gateway and the worker: the gateway's own lag histogram is reported beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from offload import Offload, Status, admin  # noqa: E402

APP = "benchmarks.gateway_app:app"
TASK = "benchmarks.gateway_app.finish"
REDIS_URL = os.environ.get("OFFLOAD_TEST_REDIS", "redis://127.0.0.1:6379/0")
PORT_LINE = re.compile(r"Uvicorn running on https?://[^:]+:(\d+)")


def raise_fd_limit(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Process:
    """A ``python -m offload ...`` child whose output is kept (and searched for a line)."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "offload", *args], cwd=ROOT, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        self.lines: list[str] = []
        self._seen = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._seen:
                self.lines.append(line.rstrip())
                self._seen.notify_all()

    def wait_for(self, pattern: re.Pattern[str], timeout: float = 30) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        with self._seen:
            while True:
                for line in self.lines:
                    found = pattern.search(line)
                    if found:
                        return found
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("not started:\n" + "\n".join(self.lines[-20:]))
                self._seen.wait(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class PeakRSS:
    """The gateway's peak resident memory: the kernel's high-water mark where there is one
    (Linux VmHWM), else the largest of samples taken every 50 ms."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.sampled = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            with contextlib.suppress(psutil.Error):
                self.sampled = max(self.sampled, self.process.memory_info().rss)

    def peak(self) -> int:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return self.sampled


@dataclass
class Clients:
    answered: dict[str, float] = field(default_factory=dict)  # task id -> wall-clock time of its answer
    statuses: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


FINAL = {"succeeded", "failed", "cancelled", "expired"}


async def request(port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\nAccept: */*\r\n\r\n".encode())
    return reader, writer


async def long_poll(port: int, task_id: str, out: Clients) -> None:
    """``GET /tasks/{id}?wait=60`` until the task has ended (a timed-out poll asks again)."""
    failures = 0
    while True:
        writer = None
        try:
            reader, writer = await request(port, f"/tasks/{task_id}?wait=60")
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
            body = json.loads(await reader.readexactly(length))
        except (OSError, asyncio.IncompleteReadError, ValueError, AttributeError) as e:
            failures += 1
            if failures > 3:
                out.errors.append(f"poll {task_id}: {e!r}")
                return
            continue
        finally:
            if writer is not None:
                writer.close()
        if body["status"] in FINAL:
            out.answered[task_id] = time.time()
            out.statuses[task_id] = body["status"]
            return


async def stream(port: int, task_id: str, out: Clients) -> None:
    """``GET /tasks/{id}/events`` until its ``done`` event. The gateway writes that event in one
    piece (one HTTP chunk), so finding it in the raw bytes needs no chunked decoding."""
    marker = b"event: done\ndata: "
    writer = None
    try:
        reader, writer = await request(port, f"/tasks/{task_id}/events")
        seen = b""
        while True:
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("the stream ended before done")
            seen += data
            at = seen.find(marker)
            if at >= 0 and b"\n" in seen[at + len(marker) :]:
                line = seen[at + len(marker) :].split(b"\n", 1)[0]
                out.answered[task_id] = time.time()
                out.statuses[task_id] = json.loads(line)["status"]
                return
    except (OSError, ValueError) as e:
        out.errors.append(f"stream {task_id}: {e!r}")
    finally:
        if writer is not None:
            writer.close()


async def waiting_clients(client: httpx.AsyncClient) -> dict[str, float]:
    text = (await client.get("/metrics")).text
    return {m[0]: float(m[1]) for m in re.findall(r'^offload_gateway_waiting_clients\{kind="(\w+)"\} (\S+)$', text, re.M)}


async def end_directly(app: Offload, ids: list[str]) -> None:
    """End every task by writing its final state, 500 per write as a busy worker's state writer
    would: measures the gateway alone, without the worker's own pace."""
    states = [s for s in await app._read_states(ids) if s is not None]
    for start in range(0, len(states), 500):
        now = dt.datetime.now(dt.UTC)
        batch = states[start : start + 500]
        for state in batch:
            state.status, state.result, state.finished_at = Status.SUCCEEDED, 0, now
        await app._write_states(batch)


def fast_server(env: dict[str, str]) -> str:
    """What uvicorn will use in a process with this environment: httptools and uvloop when
    importable (uvicorn[standard]), else h11 and asyncio."""
    found = subprocess.run([sys.executable, "-c", "import httptools, uvloop"], env=env, capture_output=True).returncode == 0
    return "httptools+uvloop" if found else "h11+asyncio"


async def run(kind: str, polls: int, streams: int, idle_s: float, ramp: int, end: str, extra_path: str | None) -> dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="offload-gateway-bench-")
    url = f"sqlite:///{tmp}/bench.db" if kind == "sqlite" else REDIS_URL
    namespace = f"gwbench{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "OFFLOAD_URL": url, "OFFLOAD_NAMESPACE": namespace, "PYTHONPATH": str(ROOT)}
    gateway_env = {**env, "PYTHONPATH": os.pathsep.join(p for p in (extra_path, str(ROOT)) if p)}
    app = Offload(url, namespace=namespace)
    n = polls + streams

    started = time.perf_counter()
    ids = [(await app.asend(TASK, i)).id for i in range(n)]
    print(f"[{kind}] enqueued {n} pending tasks in {time.perf_counter() - started:.1f} s", flush=True)

    gateway = Process(["gateway", APP, "--port", "0", "--no-access-log"], gateway_env)
    worker: Process | None = None
    try:
        port = int(gateway.wait_for(PORT_LINE).group(1))
        rss = PeakRSS(gateway.proc.pid)
        gw = psutil.Process(gateway.proc.pid)
        out = Clients()
        timeout = httpx.Timeout(120, connect=30)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=timeout) as control:
            # Connect in steps, so the listen backlog never overflows.
            tasks: list[asyncio.Task[None]] = []
            started = time.perf_counter()
            cpu_start = sum(gw.cpu_times()[:2])
            for start in range(0, n, ramp):
                for i, task_id in enumerate(ids[start : start + ramp], start):
                    tasks.append(asyncio.create_task(long_poll(port, task_id, out) if i < polls else stream(port, task_id, out)))
                want = min(start + ramp, n)
                while True:
                    counts = await waiting_clients(control)
                    if counts.get("poll", 0) + counts.get("stream", 0) >= want:
                        break
                    await asyncio.sleep(0.05)
            connect_s = time.perf_counter() - started
            connect_cpu_s = sum(gw.cpu_times()[:2]) - cpu_start
            counts = await waiting_clients(control)
            print(f"[{kind}] {counts.get('poll', 0):.0f} long polls and {counts.get('stream', 0):.0f} streams waiting "
                  f"after {connect_s:.1f} s", flush=True)

            # Only waiting now: how much CPU does the gateway spend on it?
            cpu_before = sum(gw.cpu_times()[:2])
            await asyncio.sleep(idle_s)
            idle_cpu_s = sum(gw.cpu_times()[:2]) - cpu_before
            rss_waiting = gw.memory_info().rss
            cpu_before = sum(gw.cpu_times()[:2])

            if end == "worker":
                worker = Process(["worker", APP, "-c", "200", "--log-level", "warning"], env)
            else:
                await end_directly(app, ids)
            try:
                await asyncio.wait_for(asyncio.gather(*tasks), 120)
            except TimeoutError:
                lines = worker.lines[-20:] if worker is not None else gateway.lines[-20:]
                raise RuntimeError("clients still waiting after 120 s; output:\n" + "\n".join(lines)) from None
            answer_cpu_s = sum(gw.cpu_times()[:2]) - cpu_before
            server_lag = _histogram(await control.get("/metrics"), "offload_gateway_delivery_lag_seconds")

        states = await app._read_states(ids)
        finished = {s.id: s.finished_at.timestamp() for s in states if s is not None and s.finished_at is not None}
        peak = rss.peak()
    finally:
        for process in (worker, gateway):
            if process is not None:
                process.stop()
        with contextlib.suppress(Exception):
            await admin.flush(app)
        await app.aclose()

    last_end = max(finished.values())
    lags = [out.answered[i] - finished[i] for i in out.answered if i in finished]
    return {
        "kind": kind,
        "ended_by": end,
        "gateway_server": fast_server(gateway_env),
        "clients": n,
        "answered": len(out.answered),
        "succeeded": sum(1 for s in out.statuses.values() if s == "succeeded"),
        "errors": out.errors[:5],
        "connect_s": round(connect_s, 2),
        "gateway_cpu_to_connect_s": round(connect_cpu_s, 2),
        "gateway_cpu_to_answer_s": round(answer_cpu_s, 2),
        "tasks_end_spread_s": round(last_end - min(finished.values()), 2),
        "all_answered_after_last_end_s": round(max(out.answered.values()) - last_end, 3),
        "lag_p50_s": round(statistics.median(lags), 3),
        "lag_p99_s": round(sorted(lags)[int(len(lags) * 0.99) - 1], 3),
        "lag_max_s": round(max(lags), 3),
        "gateway_lag_histogram": server_lag,
        "gateway_log_lines": len(gateway.lines),
        "gateway_peak_rss_mb": round(peak / 2**20, 1),
        "gateway_rss_waiting_mb": round(rss_waiting / 2**20, 1),
        "idle_s": idle_s,
        "gateway_cpu_while_waiting_s": round(idle_cpu_s, 3),
        "gateway_cpu_while_waiting_pct": round(100 * idle_cpu_s / idle_s, 2),
    }


def _histogram(response: httpx.Response, name: str) -> dict[str, int]:
    """Cumulative bucket counts of a histogram, as the gateway exposes it."""
    found = re.findall(rf'^{name}_bucket{{le="([^"]+)"}} (\S+)$', response.text, re.M)
    return {le: int(float(count)) for le, count in found}


def report(results: list[dict[str, Any]]) -> None:
    for r in results:
        ok = r["answered"] == r["clients"] and r["all_answered_after_last_end_s"] <= 2 and r["gateway_peak_rss_mb"] < 300
        print(f"\n== {r['kind']}: {r['clients']} clients ({'targets met' if ok else 'TARGETS MISSED'})")
        for key, value in r.items():
            if key != "kind":
                print(f"  {key:32} {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=["sqlite", "redis", "both"], default="both")
    parser.add_argument("--polls", type=int, default=2000)
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--idle", type=float, default=15.0, help="seconds the clients only wait, for the CPU figure")
    parser.add_argument("--ramp", type=int, default=250, help="connections opened per step")
    parser.add_argument("--end", choices=["worker", "direct"], default="worker",
                        help="end the tasks with a real worker (default), or by writing their final states from here")
    parser.add_argument("--gateway-path", help="an import path for the gateway process only, e.g. a directory where "
                        "httptools and uvloop are installed (pip install --target DIR httptools uvloop)")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = parser.parse_args()
    # Each client is a socket here and in the gateway (which inherits this limit).
    limit = raise_fd_limit(2 * (args.polls + args.streams) + 1024)
    if limit < args.polls + args.streams + 256:
        parser.error(f"the open-files limit is {limit}; raise it (ulimit -n) for this many clients")
    kinds = ["sqlite", "redis"] if args.kind == "both" else [args.kind]
    results = [asyncio.run(run(k, args.polls, args.streams, args.idle, args.ramp, args.end, args.gateway_path)) for k in kinds]
    report(results)
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
