"""What a worker gives operations: `--log-format json` (every line one JSON object, a task's
lines carrying its fields and the worker's registry id) and `--metrics-port` (Prometheus)."""

from __future__ import annotations

import json
import re
import socket
import urllib.request
from pathlib import Path

from offload import Offload
from tests.support import OffloadProcess, env_for, free_port


def test_json_lines_carry_the_task_and_the_worker(tmp_path: Path, namespace: str) -> None:
    url = f"sqlite:///{tmp_path / 'offload.db'}"
    app = Offload(url, namespace=namespace)
    w = OffloadProcess(["worker", "tests.apps.basic:app", "--log-format", "json"], env_for(url, namespace), ready_line="worker ready")
    try:
        r = app.ref("tests.apps.basic.add").delay(2, 3)
        assert r.get(timeout=30) == 5
        [worker] = app.workers()
        line = w.wait_for(lambda text: "succeeded" in text and r.id in text)
        w.terminate()
        assert w.wait(30) == 0
        # Every line is JSON, not only the task's
        records = [json.loads(text) for text in w.lines]
        assert all({"ts", "level", "event", "logger", "worker"} <= set(rec) for rec in records)
        done = json.loads(line)
        assert done["event"].startswith("succeeded") and done["level"] == "info"
        assert (done["task_id"], done["name"], done["queue"], done["attempt"]) == (r.id, "tests.apps.basic.add", "default", 1)
        assert isinstance(done["duration_ms"], float) and done["duration_ms"] >= 0
        assert done["worker"] == worker.id
    finally:
        w.stop()
        app.close()


def test_a_worker_serves_its_task_metrics(tmp_path: Path, namespace: str) -> None:
    url = f"sqlite:///{tmp_path / 'offload.db'}"
    app = Offload(url, namespace=namespace)
    port = free_port()
    w = OffloadProcess(["worker", "tests.apps.basic:app", "--metrics-port", str(port)], env_for(url, namespace),
                       ready_line="worker ready")
    try:
        assert f"worker metrics on http://127.0.0.1:{port}/metrics" in w.output
        assert app.ref("tests.apps.basic.add").delay(2, 3).get(timeout=30) == 5
        assert app.ref("tests.apps.basic.add").delay(1, 1).get(timeout=30) == 2
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            text = answer.read().decode()
        labels = 'name="tests.apps.basic.add",queue="default",status="succeeded"'
        counted = re.search(r"^offload_tasks_total\{" + re.escape(labels) + r"\} (\S+)$", text, re.M)
        assert counted is not None and float(counted[1]) == 2.0, text
        assert re.search(r"^offload_task_duration_seconds_count\{" + re.escape(labels) + r"\} 2\.0$", text, re.M), text
    finally:
        w.stop()
        app.close()


def test_a_metrics_port_in_use_is_one_line_and_exit_2(tmp_path: Path, namespace: str) -> None:
    url = f"sqlite:///{tmp_path / 'offload.db'}"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        w = OffloadProcess(["worker", "tests.apps.basic:app", "--metrics-port", str(port)], env_for(url, namespace), ready_line=None)
        assert w.wait(60) == 2, w.output
    assert f"offload: error: cannot serve the worker's metrics on 127.0.0.1:{port}" in w.output
    assert "Traceback" not in w.output
