"""offload side by side with Celery, RQ, Dramatiq, Huey, arq and taskiq: the same workloads, the
same local Redis, one library after another; then offload, Celery and Dramatiq on RabbitMQ, and
beside them the ``floor`` row: no library, the least a task system can do on RabbitMQ while
keeping offload's promises (benchmarks/peers/floor_peer.py).

    make bench-peers                                  # or: python benchmarks/peers.py
    python benchmarks/peers.py --quick                # 500 tasks, 100 round trips: a smoke run
    python benchmarks/peers.py --only offload,huey --brokers redis
    python benchmarks/peers.py --rounds 3             # everything three times, in turn: the medians

The peers live in their own virtual environment, benchmarks/.peers-venv, installed from
benchmarks/requirements-peers.txt plus this checkout of offload (editable); the script creates
it when missing and re-runs itself there.

For each library and broker, in a fresh driver process, with the library's own Redis database
(8 + its index below, modulo 8; flushed before and after) and its RabbitMQ queues deleted:

1. enqueue: N drain tasks sent one after another from this process (one producer);
2. drain: then one worker process is started (its own command, two cores' worth of
   concurrency, see each module in benchmarks/peers/); every task INCRs a Redis counter, and
   the rate is taken between the first and the N-th increment's timestamps, so worker
   start-up is not counted;
3. round trip: with that worker still running, send echo(i) and wait for its result with the
   library's own mechanism, R times in a row (after 10 for warm-up): p50 and p99;
4. peak RSS: the sum over the worker's process tree, sampled every 50 ms while it ran;
5. worker CPU per task: the worker tree's user+system CPU time during the drain, divided by the
   tasks run meanwhile. Unlike the rates, it barely moves when other programs load the machine;
6. servers CPU per task: the same for the local Redis and RabbitMQ processes together (what a
   library asks of the servers it shares with every other worker; on a machine of two cores it
   is also CPU the worker cannot have). Not shown when the servers run elsewhere.

The table and the ratios (offload / the best peer on each figure; the floor is not a peer, and
offload's drain and round trip are compared with it on lines of their own) are printed and,
unless --quick, written to benchmarks/results/peers-latest.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / "benchmarks" / ".peers-venv"
REQUIREMENTS = ROOT / "benchmarks" / "requirements-peers.txt"
RESULTS = ROOT / "benchmarks" / "results" / "peers-latest.md"

#: name -> module; the order is the run order, and the index picks the Redis database.
LIBRARIES = {
    "offload": "benchmarks.peers.offload_peer",
    "celery": "benchmarks.peers.celery_peer",
    "rq": "benchmarks.peers.rq_peer",
    "dramatiq": "benchmarks.peers.dramatiq_peer",
    "huey": "benchmarks.peers.huey_peer",
    "arq": "benchmarks.peers.arq_peer",
    "taskiq": "benchmarks.peers.taskiq_peer",
    "dramatiq-confirms": "benchmarks.peers.dramatiq_confirms_peer",
    "floor": "benchmarks.peers.floor_peer",
}
#: The libraries that also run on RabbitMQ; the others speak Redis only.
ON_AMQP = {"offload", "celery", "dramatiq", "dramatiq-confirms", "floor"}
#: Variants that only mean something on RabbitMQ.
AMQP_ONLY = {"dramatiq-confirms", "floor"}
#: Rows that are not libraries (the least any task system keeping offload's promises can do):
#: shown, and compared with offload on a line of their own, never taken as the best peer.
REFERENCES = {"floor"}
#: Distribution names whose versions the report shows.
DISTRIBUTIONS = {
    "offload": ["offload", "redis", "hiredis", "aio-pika"], "celery": ["celery", "kombu"], "rq": ["rq"],
    "dramatiq": ["dramatiq", "pika"], "huey": ["huey"], "arq": ["arq"], "taskiq": ["taskiq", "taskiq-redis"],
    "floor": ["amqp"],
}
#: Process names of the servers whose CPU per task the drain also reports (when they run here).
SERVER_PROCESSES = {"redis-server", "beam.smp"}
WARMUP = 10
DATABASES = 8  # from --db-base on
RESULT_MARK = "PEERS-RESULT "


@dataclass(slots=True)
class Row:
    library: str
    broker: str
    pool: str = ""
    waiter: str = ""
    enqueue_per_s: float = 0.0
    drain_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    peak_rss_mb: float = 0.0
    cpu_ms_per_task: float = 0.0
    server_cpu_ms_per_task: float = float("nan")
    error: str = ""


# -- the peers' own virtual environment --------------------------------------------------------
def in_peers_venv() -> bool:
    return Path(sys.prefix).resolve() == VENV.resolve()


def ensure_venv() -> Path:
    """Create or update benchmarks/.peers-venv; its python."""
    python = VENV / "bin" / "python"
    stamp = VENV / ".installed"
    if not python.exists():
        print(f"creating {VENV.relative_to(ROOT)}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    inputs = [REQUIREMENTS, ROOT / "pyproject.toml"]
    if not stamp.exists() or any(p.stat().st_mtime > stamp.stat().st_mtime for p in inputs):
        print(f"installing the peers into {VENV.relative_to(ROOT)}", flush=True)
        pip = [str(python), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, "--upgrade", "pip"], check=True)
        subprocess.run([*pip, "-r", str(REQUIREMENTS), "-e", f"{ROOT}[redis,amqp,fast]"], check=True)
        # Requirements whose declared dependencies conflict with the others' (see the file).
        no_deps = [line.split(None, 1)[1] for line in REQUIREMENTS.read_text().splitlines() if line.startswith("#no-deps ")]
        if no_deps:
            subprocess.run([*pip, "--no-deps", *no_deps], check=True)
        stamp.touch()
    return python


# -- one library, one broker (runs in its own process) ------------------------------------------
class PeakRSS(threading.Thread):
    """The largest sum of RSS over a process and its descendants, sampled every 50 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self._stop_event = pid, 0, threading.Event()

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop_event.wait(0.05):
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            self.peak = max(self.peak, total)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * p), len(ordered) - 1)]


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    # The worker leads its own process group (start_new_session), so its children go too.
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        pass
    try:  # a child that outlived its parent
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def tree_cpu_s(pid: int) -> float:
    """User plus system CPU seconds of a process and its live descendants."""
    import psutil

    try:
        root = psutil.Process(pid)
        return cpu_of([root.pid, *(child.pid for child in root.children(recursive=True))])
    except psutil.NoSuchProcess:
        return 0.0


def server_pids() -> list[int]:
    """The local Redis and RabbitMQ server processes (none when the servers run elsewhere)."""
    import psutil

    return [p.pid for p in psutil.process_iter(["name"]) if p.info["name"] in SERVER_PROCESSES]


def cpu_of(pids: list[int]) -> float:
    """User plus system CPU seconds of these processes (those still alive)."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def wait_drained(client: Any, n: int, worker: subprocess.Popen[bytes], log: Path) -> tuple[float, float, float, float]:
    """Wait for the n-th increment: the first and last increments' times, and the CPU
    milliseconds per task in between (read when the driver sees the first and the last one)
    of the worker and of the local Redis and RabbitMQ servers together."""
    from benchmarks.peers.base import COUNTER, FIRST, LAST

    # Generous: start-up plus 20 tasks/s, far below any library measured here.
    deadline = time.monotonic() + 60 + n / 20
    servers = server_pids()
    cpu_from: tuple[float, float, int] | None = None
    while True:
        if cpu_from is None and client.exists(FIRST):
            cpu_from = tree_cpu_s(worker.pid), cpu_of(servers), int(client.get(COUNTER) or 0)
        last = client.get(LAST)
        if last is not None:
            cpu_ms = server_ms = float("nan")
            if cpu_from is not None and cpu_from[2] < n:
                tasks = n - cpu_from[2]
                cpu_ms = (tree_cpu_s(worker.pid) - cpu_from[0]) * 1000 / tasks
                if servers:
                    server_ms = (cpu_of(servers) - cpu_from[1]) * 1000 / tasks
            return float(client.get(FIRST)), float(last), cpu_ms, server_ms
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited with code {worker.returncode}:\n{tail(log)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"drained only {int(client.get(COUNTER) or 0)} of {n} tasks:\n{tail(log)}")
        time.sleep(0.02)


def tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def drive(args: argparse.Namespace) -> Row:
    """Everything for one library on one broker; runs in a driver process of its own."""
    import redis

    from benchmarks.peers.base import Peer, Settings

    redis_url = f"{args.redis.rstrip('/')}/{args.db}"
    settings = Settings(args.broker, args.amqp if args.broker == "amqp" else redis_url, redis_url)
    os.environ.update(settings.env())
    module = importlib.import_module(LIBRARIES[args.drive])
    peer: Peer = module.PEER(settings)
    row = Row(args.drive, args.broker, peer.pool, peer.waiter)
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    peer.reset()
    log = Path(tempfile.mkstemp(prefix=f"peers-{args.drive}-{args.broker}-", suffix=".log")[1])
    worker: subprocess.Popen[bytes] | None = None
    try:
        t0 = time.perf_counter()
        peer.enqueue(args.n, args.n)
        row.enqueue_per_s = args.n / (time.perf_counter() - t0)

        env = {**os.environ, **settings.env(), "PYTHONPATH": str(ROOT)}
        with log.open("wb") as out:
            worker = subprocess.Popen(
                peer.worker_argv(Path(sys.executable).parent), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        rss = PeakRSS(worker.pid)
        rss.start()
        try:
            first, last, row.cpu_ms_per_task, row.server_cpu_ms_per_task = wait_drained(client, args.n, worker, log)
            row.drain_per_s = (args.n - 1) / (last - first)
            peer.round_trips(WARMUP)
            latencies = peer.round_trips(args.round_trips)
        finally:
            stop_worker(worker)
            row.peak_rss_mb = rss.stop() / 2**20
        row.p50_ms = statistics.median(latencies)
        row.p99_ms = percentile(latencies, 0.99)
    finally:
        if worker is not None and worker.poll() is None:
            stop_worker(worker)
        peer.cleanup()
        peer.close()
        client.flushdb()
        client.close()
    log.unlink()
    return row


# -- the whole run ------------------------------------------------------------------------------
def reachable(url: str, default_port: int) -> bool:
    parts = urllib.parse.urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or default_port), timeout=2):
            return True
    except OSError:
        return False


def run_one(name: str, broker: str, db: int, args: argparse.Namespace) -> Row:
    cmd = [
        sys.executable, __file__, "--drive", name, "--broker", broker, "--db", str(db), "-n", str(args.n),
        "--round-trips", str(args.round_trips), "--redis", args.redis, "--amqp", args.amqp,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, timeout=3600)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return Row(**json.loads(line.removeprefix(RESULT_MARK)))
    return Row(name, broker, error=f"driver exited with {proc.returncode}")


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for names in DISTRIBUTIONS.values():
        for dist in names:
            try:
                out[dist] = version(dist)
            except PackageNotFoundError:
                out[dist] = "?"
    return out


def server_versions(args: argparse.Namespace, with_amqp: bool) -> str:
    import redis

    client = redis.Redis.from_url(args.redis)
    text = f"Redis {client.info('server')['redis_version']}"
    client.close()
    if with_amqp:
        import pika

        conn = pika.BlockingConnection(pika.URLParameters(args.amqp))
        version = conn._impl.server_properties.get("version", "?")
        text += f", RabbitMQ {version.decode() if isinstance(version, bytes) else version}"
        conn.close()
    return text


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def medians(runs: list[Row]) -> list[Row]:
    """One row per library and broker: the median of each figure over its rounds that succeeded."""
    rows: list[Row] = []
    for key in dict.fromkeys((r.library, r.broker) for r in runs):
        group = [r for r in runs if (r.library, r.broker) == key]
        good = [r for r in group if not r.error]
        if not good:
            rows.append(group[-1])
            continue
        row = dataclasses.replace(good[0])
        for name in ("enqueue_per_s", "drain_per_s", "p50_ms", "p99_ms", "peak_rss_mb", "cpu_ms_per_task", "server_cpu_ms_per_task"):
            setattr(row, name, statistics.median(getattr(r, name) for r in good))
        rows.append(row)
    return rows


def ratios(rows: list[Row]) -> list[str]:
    """offload / the best peer, per broker and figure; then offload / each reference row."""
    figures = [  # field, label, unit, whether higher is better
        ("enqueue_per_s", "enqueue", "/s", True), ("drain_per_s", "drain", "/s", True),
        ("p50_ms", "round trip p50", " ms", False), ("p99_ms", "round trip p99", " ms", False),
        ("cpu_ms_per_task", "worker CPU/task", " ms", False), ("peak_rss_mb", "worker peak RSS", " MB", False),
    ]
    lines = []
    for broker in dict.fromkeys(r.broker for r in rows):
        ours = next((r for r in rows if r.broker == broker and r.library == "offload" and not r.error), None)
        if ours is None:
            continue
        others = [r for r in rows if r.broker == broker and r.library != "offload" and not r.error]
        peers = [r for r in others if r.library not in REFERENCES]
        for field, label, unit, higher in figures if peers else []:
            best = (max if higher else min)(peers, key=lambda r, f=field: getattr(r, f))  # type: ignore[misc]
            lines.append(_ratio_line(broker, label, unit, higher, getattr(ours, field), f"best peer {best.library:9}", getattr(best, field), "peer"))
        for reference in (r for r in others if r.library in REFERENCES):
            for field, label, unit, higher in figures[1:3]:
                mine, theirs = getattr(ours, field), getattr(reference, field)
                lines.append(_ratio_line(broker, label, unit, higher, mine, f"{reference.library:19}", theirs, reference.library))
    return lines


def _ratio_line(broker: str, label: str, unit: str, higher: bool, mine: float, who: str, theirs: float, other: str) -> str:
    ratio = mine / theirs if theirs else float("inf")
    better = ratio > 1 if higher else ratio < 1
    return (
        f"{broker:5} {label:16} offload {mine:8.1f}{unit:3}  {who} {theirs:8.1f}{unit:3}"
        f"  ratio {ratio:5.2f}  ({'offload' if better else other} ahead)"
    )


def table(rows: list[Row]) -> list[str]:
    head = (
        "| library | broker | enqueue /s | drain /s | worker CPU ms/task | servers CPU ms/task | round trip p50 ms "
        "| p99 ms | worker peak RSS MB |"
    )
    lines = [head, "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.library} | {r.broker} | failed: {r.error} | | | | | | |")
        else:
            lines.append(
                f"| {r.library} | {r.broker} | {r.enqueue_per_s:,.0f} | {r.drain_per_s:,.0f} | {r.cpu_ms_per_task:.2f} | "
                f"{r.server_cpu_ms_per_task:.2f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.peak_rss_mb:.0f} |"
            )
    return lines


def how(rows: list[Row]) -> list[str]:
    seen: dict[str, Row] = {}
    for r in rows:
        if r.pool:
            seen.setdefault(r.library, r)
    return [f"| {r.library} | {r.pool} | {r.waiter} |" for r in seen.values()]


def orchestrate(args: argparse.Namespace) -> None:
    if not reachable(args.redis, 6379):
        sys.exit(f"peers: error: Redis is not reachable at {args.redis}")
    brokers = [b for b in args.brokers.split(",") if b]
    if "amqp" in brokers and not reachable(args.amqp, 5672):
        print(f"RabbitMQ is not reachable at {args.amqp}: skipping the amqp runs", file=sys.stderr)
        brokers.remove("amqp")
    names = [n for n in (args.only.split(",") if args.only else LIBRARIES) if n]
    unknown = set(names) - set(LIBRARIES)
    if unknown:
        sys.exit(f"peers: error: unknown library {sorted(unknown)}; choose from {', '.join(LIBRARIES)}")
    # Read before the runs: a failure here must not cost a whole run's figures.
    servers = server_versions(args, "amqp" in brokers)
    v = versions()
    load_before = os.getloadavg()
    started = dt.datetime.now(dt.UTC)
    runs: list[Row] = []
    # Every round runs every library once, in the same order; the figures are the median over the
    # rounds, so a moment of load elsewhere on the machine weighs on one round, not on the ratio.
    for round_no in range(1, args.rounds + 1):
        for broker in brokers:
            for name in names:
                if (broker == "amqp" and name not in ON_AMQP) or (broker != "amqp" and name in AMQP_ONLY):
                    continue
                print(f"{name} on {broker}" + (f", round {round_no}" if args.rounds > 1 else "") + " ...", flush=True)
                # Eight databases for nine rows: one is shared, harmlessly, since each run flushes
                # its database before and after and the runs go one at a time.
                db = args.db_base + list(LIBRARIES).index(name) % DATABASES
                row = run_one(name, broker, db, args)
                runs.append(row)
                if row.error:
                    print(f"  {name} on {broker} failed: {row.error}", file=sys.stderr)
    rows = medians(runs)
    load_after = os.getloadavg()

    command = "python benchmarks/peers.py " + shlex.join(sys.argv[1:])
    lines = table(rows)
    ratio_lines = ratios(rows)
    print()
    print("\n".join(lines))
    print()
    print("offload / best peer, and / each reference row (rates: higher is better; latency and memory: lower is better)")
    print("\n".join(ratio_lines))
    print(f"\nload average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    if args.out is None:
        print("(--quick: not written; pass --out FILE to keep it)")
        return
    report = [
        "# offload and its peers, side by side",
        "",
        f"`{command.strip()}` on {started:%Y-%m-%d %H:%M} UTC: {args.n:,} tasks for enqueue and drain, "
        f"{args.round_trips} round trips"
        + (f"; each figure is the median of {args.rounds} rounds (every library once per round, in turn)." if args.rounds > 1 else "."),
        f"{os.cpu_count()} cores ({cpu_model()}), Python {platform.python_version()}, "
        f"{servers}; load average {load_before[0]:.2f} before the run, "
        f"{load_after[0]:.2f} after.",
        "",
        *lines,
        "",
        "offload / the best peer on each figure, then / each reference row (rates: above 1 is better; latency and "
        "memory: below 1 is better):",
        "",
        *(["```", *ratio_lines, "```"] if ratio_lines else ["(offload, or every peer, is missing from this run)"]),
        "",
        "| library | worker (one process) | round trip waits with |",
        "| --- | --- | --- |",
        *how(rows),
        "",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
        "Enqueue: one producer, one call after another (offload, Celery, RQ, Dramatiq, Huey: their sync call; "
        "arq and taskiq: their async call on one event loop). Drain: every task INCRs a Redis counter; the rate "
        "is taken between the first and the last increment. Every library stores every task's result. "
        "Workers log warnings only. On RabbitMQ, offload's enqueue waits for the broker's publisher confirm "
        "and writes the task's queued state to Redis first; Celery and Dramatiq publish without confirms by "
        "default. The floor row is no library: a py-amqp caller and a one-thread py-amqp worker that keep "
        "offload's promises (persistent messages on a priority queue, the confirm, the QUEUED state, the claim) "
        "and do nothing else. See benchmarks/peers.py and docs/performance.md.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(report))
    print(f"written to {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="500 tasks and 100 round trips; writes no report")
    parser.add_argument("-n", type=int, help="tasks for the enqueue and drain runs (default 5000)")
    parser.add_argument("--round-trips", type=int, help="round trips (default 500)")
    parser.add_argument("--only", help="comma-separated libraries (default: all)")
    parser.add_argument("--rounds", type=int, default=1, help="run everything this many times; report the medians")
    parser.add_argument("--brokers", default="redis,amqp", help="comma-separated: redis, amqp (default: both)")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379", help="Redis server, without a database")
    parser.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672/%2F", help="RabbitMQ URL")
    parser.add_argument("--db-base", type=int, default=8, help=f"the first of the {DATABASES} Redis databases used (flushed!)")
    parser.add_argument("--out", type=Path, help=f"report file (default {RESULTS.relative_to(ROOT)}, none with --quick)")
    parser.add_argument("--drive", help=argparse.SUPPRESS)
    parser.add_argument("--broker", help=argparse.SUPPRESS)
    parser.add_argument("--db", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.n = args.n or (500 if args.quick else 5000)
    args.round_trips = args.round_trips or (100 if args.quick else 500)
    if args.out is None and not args.quick:
        args.out = RESULTS

    if not in_peers_venv():
        python = ensure_venv()
        os.execv(python, [str(python), __file__, *sys.argv[1:]])
    sys.path.insert(0, str(ROOT))
    if args.drive:
        row = drive(args)
        print(RESULT_MARK + json.dumps(dataclasses.asdict(row)), flush=True)
        return
    orchestrate(args)


if __name__ == "__main__":
    main()
