"""Faults provoked for real: SIGKILL, SIGTERM, garbage bytes, tampered messages."""

from __future__ import annotations

import collections
import os
import signal
import time

import pytest

from offload import Offload, Status
from offload.message import Envelope
from tests.conformance.conftest import Harness
from tests.process_harness import dead_reasons, inject
from tests.support import wait_until


def test_sigkill_during_1000_tasks_loses_nothing(harness: Harness) -> None:
    harness.needs_processes()
    log = harness.tmp_path / "executions"
    record = harness.task("record")
    results = [record.delay(str(log), f"t{i}", 0.002) for i in range(1000)]
    w = harness.worker("-c", "4")
    wait_until(lambda: log.exists() and len(log.read_text().split()) >= 200, 60, "200 executions")
    w.kill()
    done_at_kill = len(log.read_text().split())
    assert done_at_kill < 1000, "the worker finished before it was killed; nothing was tested"
    harness.worker("-c", "4")
    for r in results:
        r.get(timeout=120)
    counts = collections.Counter(log.read_text().split())
    assert set(counts) == {f"t{i}" for i in range(1000)}
    # Only what the killed worker held may run twice: leased messages (-c 4 plus a prefetch of
    # 4) and finished ones whose ack was still in the batch being written. Never a third time.
    twice = [t for t, n in counts.items() if n > 1]
    assert max(counts.values()) <= 2 and len(twice) <= 24, twice
    assert all(r.status() is Status.SUCCEEDED for r in results)


def test_long_task_keeps_its_lease_and_is_not_run_twice(harness: Harness) -> None:
    harness.needs_processes()
    log = harness.tmp_path / "executions"
    # The lease is 3 s in these tests; the task runs longer, two workers compete.
    r = harness.task("record").delay(str(log), "long", 5.0)
    harness.worker("-c", "1")
    harness.worker("-c", "1")
    assert r.get(timeout=30) == "long"
    assert log.read_text().split() == ["long"]


def test_sigterm_lets_the_running_task_finish_and_exits_zero(harness: Harness) -> None:
    harness.needs_processes()
    marker = harness.tmp_path / "started"
    running = harness.task("touch_then_sleep").delay(str(marker), 1.5)
    w = harness.worker("-c", "1", "--prefetch", "0")
    wait_until(marker.exists, 20, "task start")
    waiting = harness.task("add").delay(1, 1)
    w.terminate()
    assert w.wait(30) == 0
    assert running.status() is Status.SUCCEEDED
    assert waiting.status() is Status.QUEUED  # not started, still there for the next worker
    harness.worker()
    assert waiting.get(timeout=20) == 2


def test_sigterm_puts_back_at_once_a_task_waiting_for_a_thread(harness: Harness) -> None:
    """With one thread, the second task leased waits at the threads to start as soon as the
    first ends; a shutdown takes it back unrun instead of running it in the grace period."""
    harness.needs_processes()
    running = harness.task("touch_then_sleep").delay(str(harness.tmp_path / "started"), 1.5)
    waiting = harness.task("add").delay(1, 1)
    w = harness.worker("-c", "1", "--prefetch", "1")
    w.wait_for(f"handed to the task threads tests.apps.basic.add[{waiting.id}]")
    wait_until(lambda: running.status() is Status.STARTED, 20, "task start")
    assert waiting.status() is Status.QUEUED  # not STARTED while it waits for the thread
    w.terminate()
    assert w.wait(30) == 0
    assert running.status() is Status.SUCCEEDED
    assert waiting.status() is Status.QUEUED
    harness.worker()
    assert waiting.get(timeout=20) == 2


def test_grace_period_over_puts_the_task_back(harness: Harness) -> None:
    harness.needs_processes()
    log = harness.tmp_path / "executions"
    r = harness.task("record").delay(str(log), "slow", 4.0)
    w = harness.worker("-c", "1", "--grace", "0.5")
    wait_until(lambda: r.status() is Status.STARTED, 20, "task start")
    w.terminate()
    assert w.wait(30) == 0
    assert r.status() is Status.QUEUED
    harness.worker("-c", "1")
    assert r.get(timeout=30) == "slow"


def test_second_signal_puts_back_at_once(harness: Harness) -> None:
    harness.needs_processes()
    r = harness.task("record").delay(str(harness.tmp_path / "log"), "slow", 20.0)
    w = harness.worker("-c", "1", "--grace", "60")
    wait_until(lambda: r.status() is Status.STARTED, 20, "task start")
    w.terminate()
    w.wait_for("stopping: no new tasks")
    started = time.monotonic()
    w.terminate()
    assert w.wait(20) == 0
    assert time.monotonic() - started < 10
    assert r.status() is Status.QUEUED


def test_garbage_bytes_are_dead_lettered_and_the_worker_serves_on(harness: Harness) -> None:
    harness.worker()
    garbage = inject(harness, b"\x00\x01 this is not a message \xff")
    half = inject(harness, harness.app.codec.encode(Envelope(id="x", name="y"))[:6])
    assert harness.task("add").delay(1, 2).get(timeout=20) == 3
    wait_until(lambda: len(dead_reasons(harness)) == 2, 20, "two dead letters")
    reasons = dead_reasons(harness)
    assert reasons[garbage].startswith("malformed: not an offload message")
    assert reasons[half].startswith("malformed:")


def test_tampered_and_unsigned_messages_are_refused(harness: Harness) -> None:
    signed = harness.make_app(secret="s3cret")
    try:
        harness.worker(extra_env={"OFFLOAD_TEST_SECRET": "s3cret"}, app=signed)
        body = signed.codec.encode(signed.build("tests.apps.basic.add", (1, 2), {}, signed.ref("tests.apps.basic.add").opts))
        tampered = bytearray(body)
        tampered[-3] ^= 0x01
        bad = inject(harness, bytes(tampered))
        unsigned = inject(harness, Offload("memory://x").codec.encode(Envelope(id="u", name="tests.apps.basic.add", args=(1, 1))))
        assert signed.ref("tests.apps.basic.add").delay(2, 2).get(timeout=20) == 4
        wait_until(lambda: len(dead_reasons(harness)) == 2, 20, "two dead letters")
        reasons = dead_reasons(harness)
        assert reasons[bad].startswith("rejected: bad signature")
        assert reasons[unsigned].startswith("rejected: unsigned message refused")
    finally:
        signed.close()


def test_max_tasks_per_child_recycles_children(harness: Harness) -> None:
    harness.needs_processes()
    harness.worker("--pool", "process", "-c", "1", "--max-tasks-per-child", "2")
    pids = [harness.task("worker_pid").delay().get(timeout=30) for _ in range(4)]
    assert pids[0] == pids[1] and pids[2] == pids[3] and pids[1] != pids[2]
    assert all(p != os.getpid() for p in pids)


@pytest.mark.parametrize("sig", [signal.SIGINT])
def test_sigint_also_stops_gracefully(harness: Harness, sig: signal.Signals) -> None:
    harness.needs_processes()
    w = harness.worker()
    assert harness.task("add").delay(1, 1).get(timeout=20) == 2
    w.proc.send_signal(sig)
    assert w.wait(30) == 0
