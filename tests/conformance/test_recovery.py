"""Heartbeats and recovery with real worker processes: the registry sees a worker from ready to
exit; the tasks of a worker killed with SIGKILL start again elsewhere within the heartbeat
timeout (the test URLs lease for 3 s; RabbitMQ redelivers when the connection drops); a worker
frozen (SIGSTOP) past its heartbeat and then resumed never settles a task its successor holds."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from offload import Status
from tests.conformance.conftest import Harness
from tests.support import wait_until

# The leased brokers' test URLs say ?visibility_timeout=3: a lease runs out 3 s after its
# last renewal. Starting again takes a fetch more (at most its 0.5 s wait).
LEASE_S = 3.0


def runs(marker_dir: Path) -> dict[str, set[int]]:
    """The pids that started each task id."""
    found: dict[str, set[int]] = {}
    for p in marker_dir.iterdir():
        task_id, pid = p.name.rsplit(".", 1)
        found.setdefault(task_id, set()).add(int(pid))
    return found


def test_the_registry_sees_a_worker_from_ready_to_exit(harness: Harness) -> None:
    harness.needs_processes()
    w = harness.worker("-c", "3", "-q", "images,default")
    [info] = harness.app.workers()
    assert info.pid == w.proc.pid and info.queues == ("images", "default") and info.concurrency == 3
    assert info.pool == "thread" and info.running == ()
    # A task held shows among its running ones at the next heartbeat
    markers = harness.tmp_path / "markers"
    markers.mkdir()
    r = harness.task("hold").delay(str(markers), 8.0)
    wait_until(lambda: bool(runs(markers)), 30, "the task to start")
    deadline = time.monotonic() + 10
    while r.id not in harness.app.workers()[0].running:
        assert time.monotonic() < deadline, "the running task never showed in the worker's record"
        time.sleep(0.1)
    # A clean exit removes the record at once
    w.terminate()
    assert w.wait(30) == 0
    assert harness.app.workers() == []


def test_a_killed_workers_tasks_start_again_within_the_heartbeat_timeout(harness: Harness) -> None:
    harness.needs_processes()
    markers = harness.tmp_path / "markers"
    markers.mkdir()
    first = harness.worker("-c", "2")
    sent = [harness.task("hold").delay(str(markers), 600.0) for _ in range(2)]
    wait_until(lambda: len(runs(markers)) == 2, 30, "the first worker to start both tasks")
    harness.worker("-c", "2")
    killed_at = time.monotonic()
    first.kill()
    wait_until(lambda: all(len(runs(markers).get(r.id, ())) == 2 for r in sent), 30, "both tasks to start again")
    # Within the lease (plus a fetch), not after the 60 s the lease used to be
    assert time.monotonic() - killed_at < LEASE_S + 2.0
    # And the dead worker drops out of the registry by itself
    deadline = time.monotonic() + LEASE_S + 10
    while first.proc.pid in {w.pid for w in harness.app.workers()}:
        assert time.monotonic() < deadline, "the killed worker is still listed"
        time.sleep(0.1)


def test_a_frozen_worker_resumed_never_settles_the_task_its_successor_holds(harness: Harness) -> None:
    harness.needs_processes()
    markers = harness.tmp_path / "markers"
    markers.mkdir()
    frozen = harness.worker("-c", "1")
    r = harness.task("hold").delay(str(markers), 5.0)
    wait_until(lambda: r.id in runs(markers), 30, "the first worker to start the task")
    # When the worker is frozen past its heartbeat timeout
    os.kill(frozen.proc.pid, signal.SIGSTOP)
    try:
        successor = harness.worker("-c", "1")
        # RabbitMQ notices the frozen connection by its missed heartbeats: about the timeout
        wait_until(lambda: len(runs(markers)[r.id]) == 2, 40, "the successor to start the task")
    finally:
        os.kill(frozen.proc.pid, signal.SIGCONT)
    # Then, resumed, it finds its lease gone, says so and drops the outcome of its own run
    frozen.wait_for("lease lost", timeout=30)
    state = r.state()
    assert state.status is Status.STARTED, state
    # And the successor's run is the one that settles the task
    assert r.get(timeout=30) == successor.proc.pid
    assert r.state().attempts >= 1
