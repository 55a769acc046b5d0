"""`offload worker` started while its broker is down: it waits, retrying with backoff and a
warning each time (password masked), serves once the broker answers, stops at once on
SIGTERM/SIGINT meanwhile, and gives up with exit 69 after --connect-timeout."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest

from offload import Offload
from tests.conftest import REDIS_URL, require_server
from tests.support import OffloadProcess, RedisServer, env_for, free_port

APP = "tests.apps.basic:app"
RETRYING = re.compile(r"broker (\S+) unavailable \((.+)\); retrying in (\d+\.\d) s$")


def waiting_worker(url: str, namespace: str, *args: str, results: str | None = None) -> OffloadProcess:
    """A worker process, returned once it has said that it is retrying the broker."""
    w = OffloadProcess(["worker", APP, "--log-level", "info", *args], env_for(url, namespace, results), ready_line=None)
    try:
        w.wait_for("retrying in", timeout=30)
    except BaseException:
        w.kill()
        raise
    return w


def test_a_worker_waits_for_redis_then_serves(namespace: str) -> None:
    # Given a worker (with a beat) started while nothing listens on its broker's port
    redis = RedisServer(password="hunter2")
    port, url = redis.port, redis.url
    w = waiting_worker(url, namespace, "--beat")
    app = Offload(url, namespace=namespace)
    try:
        # Then it says what it waits for, without the password, and does not exit
        found = RETRYING.search(w.wait_for("retrying in"))
        assert found is not None, w.output
        assert found[1] == f"redis://:***@127.0.0.1:{port}/0"
        assert "hunter2" not in w.output
        assert w.proc.poll() is None
        # When the server comes up
        redis.start()
        # Then the worker becomes ready, only then starts its beat, and runs a task sent to it
        ready = w.wait_for("worker ready", timeout=60)
        assert redis.proc is not None and redis.proc.poll() is None
        beat = w.wait_for("beat: the app has no periodic tasks")
        assert w.lines.index(beat) > w.lines.index(ready), w.output
        assert app.ref("tests.apps.basic.add").delay(2, 3).get(timeout=30) == 5
        w.terminate()
        assert w.wait(30) == 0
    finally:
        w.stop()
        app.close()
        redis.stop()


@pytest.mark.parametrize(("sig", "args"), [(signal.SIGTERM, ()), (signal.SIGINT, ("--burst",))], ids=["sigterm", "sigint-burst"])
def test_a_signal_while_waiting_for_the_broker_exits_zero_at_once(namespace: str, sig: signal.Signals, args: tuple[str, ...]) -> None:
    # Given a worker waiting for a broker that is down (a burst worker waits too)
    w = waiting_worker(f"redis://127.0.0.1:{free_port()}/0", namespace, *args)
    try:
        # When it is signalled, during a pause or a connection attempt
        signalled = time.monotonic()
        w.proc.send_signal(sig)
        # Then it exits 0 promptly, without ever having been ready
        assert w.wait(10) == 0, w.output
        assert time.monotonic() - signalled < 2.0, w.output
        assert "worker stopped before it could reach the broker" in w.output
        assert "worker ready" not in w.output
    finally:
        w.stop()


def test_a_sqlite_file_that_cannot_be_opened_is_waited_for(tmp_path: Path, namespace: str) -> None:
    # Given a worker whose database file is not a database
    path = tmp_path / "offload.db"
    path.write_bytes(b"this is not sqlite" * 100)
    url = f"sqlite:///{path}"
    w = waiting_worker(url, namespace)
    app: Offload | None = None
    try:
        assert "offload.db" in w.wait_for("retrying in")
        # When the file is replaced by a good one
        path.unlink()
        app = Offload(url, namespace=namespace)
        result = app.ref("tests.apps.basic.add").delay(4, 5)
        # Then the worker becomes ready and runs the task
        w.wait_for("worker ready", timeout=30)
        assert result.get(timeout=30) == 9
    finally:
        w.stop()
        if app is not None:
            app.close()


def test_connect_timeout_gives_up_with_exit_69_after_backing_off(namespace: str) -> None:
    require_server("redis")  # the amqp broker's results live in Redis, which is up
    # Given an amqp broker on a port where nothing listens (each attempt gives up after 0.2 s)
    port = free_port()
    url = f"amqp://guest:hunter2@127.0.0.1:{port}/?connect_timeout=0.2"
    started = time.monotonic()
    w = OffloadProcess(["worker", APP, "--connect-timeout", "3"], env_for(url, namespace, f"{REDIS_URL}"), ready_line=None)
    try:
        # Then it retries with growing pauses, and after 3 s exits 69 with one line saying why
        assert w.wait(30) == 69, w.output
        elapsed = time.monotonic() - started
        pauses = [float(m[3]) for line in w.lines if (m := RETRYING.search(line))]
        assert len(pauses) >= 2, w.output
        assert 0.35 <= pauses[0] <= 0.65 and 0.7 <= pauses[1] <= 1.3, pauses
        assert 3.0 <= elapsed < 20, w.output
        last = w.lines[-1]
        assert last.startswith(f"offload: error: broker unavailable at amqp://guest:***@127.0.0.1:{port}/"), last
        assert "gave up after waiting" in last and "connect timeout 3 s" in last, last
        assert "hunter2" not in w.output and "Traceback" not in w.output
    finally:
        w.stop()


def test_connect_timeout_zero_tries_once(namespace: str) -> None:
    w = OffloadProcess(["worker", APP, "--burst", "--connect-timeout", "0"],
                       env_for(f"redis://127.0.0.1:{free_port()}/0", namespace), ready_line=None)
    try:
        assert w.wait(30) == 69, w.output
        assert "retrying in" not in w.output
        assert w.lines[-1].startswith("offload: error: broker unavailable at redis://127.0.0.1:"), w.output
    finally:
        w.stop()
