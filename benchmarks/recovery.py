"""How long the tasks of a worker killed with SIGKILL stay unseen: one worker holds a task in
each of its places, a second worker waits idle, the first is killed, and the time is measured
from the kill until every one of its tasks has started again on the second. Default settings
(heartbeat_timeout 10 s, no visibility_timeout in the URL).

    python benchmarks/recovery.py                       # sqlite, redis and amqp
    python benchmarks/recovery.py --brokers redis --runs 5
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

REDIS = "redis://127.0.0.1:6379/0"
BROKERS = {
    "sqlite": ("sqlite:///{tmp}/offload.db", None),
    "redis": (REDIS, None),
    "amqp": ("amqp://guest:guest@127.0.0.1:5672/", REDIS),
}
PLACES = 4


def start_worker(url: str, ns: str, results: str | None, ready: Path) -> subprocess.Popen[bytes]:
    # src first: the worker runs this tree's code, not an installed copy.
    env = {**os.environ, "OFFLOAD_URL": url, "OFFLOAD_NAMESPACE": ns,
           "PYTHONPATH": os.pathsep.join((str(ROOT / "src"), str(ROOT)))}
    if results:
        env["OFFLOAD_BENCH_RESULTS"] = results
    log = ready.open("wb")
    return subprocess.Popen([sys.executable, "-m", "offload", "worker", "benchmarks.bench_app:app", "-c", str(PLACES),
                             "--log-level", "info"], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.01)


def one_run(kind: str, tmp: Path) -> float:
    url_template, results = BROKERS[kind]
    url = url_template.format(tmp=tmp)
    ns = f"bench-recovery-{uuid.uuid4().hex[:8]}"
    os.environ.update(OFFLOAD_URL=url, OFFLOAD_NAMESPACE=ns)
    if results:
        os.environ["OFFLOAD_BENCH_RESULTS"] = results
    from benchmarks.bench_app import Offload, flush, hold

    app = Offload(url, namespace=ns, results=results)
    markers = tmp / f"markers-{ns}"
    markers.mkdir()
    first = start_worker(url, ns, results, tmp / f"{ns}-first.log")
    second = None
    try:
        sent = [app.ref(hold.name).delay(str(markers), 600.0).id for _ in range(PLACES)]
        try:
            wait(lambda: len(list(markers.iterdir())) == PLACES, 60, "the first worker to start every task")
        except SystemExit:
            print((tmp / f"{ns}-first.log").read_text()[-3000:], file=sys.stderr)
            raise
        second_log = tmp / f"{ns}-second.log"
        second = start_worker(url, ns, results, second_log)
        wait(lambda: b"worker ready" in second_log.read_bytes(), 60, "the second worker")
        killed_at = time.monotonic()
        first.send_signal(signal.SIGKILL)
        first.wait()

        def all_restarted() -> bool:
            restarted = {p.name.split(".")[0] for p in markers.iterdir() if not p.name.endswith(f".{first.pid}")}
            return restarted >= set(sent)

        wait(all_restarted, 120, "the tasks to start again")
        return time.monotonic() - killed_at
    finally:
        for w in (first, second):
            if w is not None and w.poll() is None:
                w.send_signal(signal.SIGKILL)
                w.wait()
        flush(app)
        app.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--brokers", default="sqlite,redis,amqp")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(f"{'broker':8} {'runs':>4} {'median s':>9} {'max s':>7}   (kill -9 to all {PLACES} tasks started again)")
    for kind in args.brokers.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            times = [one_run(kind, Path(tmp)) for _ in range(args.runs)]
        print(f"{kind:8} {args.runs:>4} {statistics.median(times):>9.2f} {max(times):>7.2f}")


if __name__ == "__main__":
    main()
