"""`offload ping` and `offload status` with live workers: exit codes for monitors, `--json`."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

from offload import Offload
from tests.support import OffloadProcess, env_for, free_port, run_cli, start_worker

APP = "tests.apps.basic:app"


def test_ping_and_status_see_a_live_worker_and_say_why_not(tmp_path: Path, namespace: str) -> None:
    url = f"sqlite:///{tmp_path / 'offload.db'}"
    # With no worker: ping fails, saying so
    none = run_cli(url, namespace, "ping", APP)
    assert none.returncode == 1 and none.stdout.startswith("CRITICAL: 0 live workers"), none
    w = start_worker(url, namespace, "-q", "images,default", "-c", "2")
    try:
        ok = run_cli(url, namespace, "ping", APP, "-q", "images")
        assert ok.returncode == 0 and ok.stdout.strip() == f"OK: 1 live worker of queue 'images' in namespace '{namespace}'", ok
        here = run_cli(url, namespace, "ping", APP, "--hostname", socket.gethostname())
        assert here.returncode == 0, here
        for args, why in ((["-q", "exports"], "of queue 'exports'"), (["--min-workers", "2"], "fewer than 2"),
                          (["--hostname", "elsewhere"], "on elsewhere")):
            failed = run_cli(url, namespace, "ping", APP, *args)
            assert failed.returncode == 1 and why in failed.stdout and failed.stdout.startswith("CRITICAL"), failed
        # status --json: the queues and the workers, as one object
        view = json.loads(run_cli(url, namespace, "status", APP, "--json").stdout)
        assert view["namespace"] == namespace and view["queues"] == {}
        [worker] = view["workers"]
        assert worker["pid"] == w.proc.pid and worker["queues"] == ["images", "default"] and worker["concurrency"] == 2
        text = run_cli(url, namespace, "status", APP).stdout
        assert "workers: 1 live" in text and f"pid {w.proc.pid}" in text
    finally:
        w.stop()
    # After a clean exit the worker is gone at once
    assert run_cli(url, namespace, "ping", APP).returncode == 1


def test_ping_with_the_broker_down_exits_69(namespace: str) -> None:
    down = run_cli(f"redis://127.0.0.1:{free_port()}/0", namespace, "ping", APP)
    assert down.returncode == 69, down
    assert down.stderr.startswith("offload: error: ") and "Traceback" not in down.stderr


def test_status_watch_refreshes_until_interrupted(tmp_path: Path, namespace: str) -> None:
    url = f"sqlite:///{tmp_path / 'offload.db'}"
    watch = OffloadProcess(["status", APP, "--watch", "--interval", "0.2"], env_for(url, namespace), ready_line=None)
    app = Offload(url, namespace=namespace)
    try:
        # Given a watch (piped: one frame after another) that has drawn the empty namespace
        watch.wait_for("workers: none live")
        # When a task is queued, a later frame shows it without being asked
        app.ref("tests.apps.basic.add").options(queue="images").delay(1, 2)
        watch.wait_for(lambda line: re.search(r"queue images\s+1$", line) is not None, timeout=10)
        # And Ctrl-C ends the watch with exit 0
        watch.interrupt()
        assert watch.wait(10) == 0, watch.output
        assert "Traceback" not in watch.output
    finally:
        watch.stop()
        app.close()
