"""App configuration: URLs, environment, namespaces, unreachable brokers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from offload import BrokerUnavailable, ConfigError, Offload
from offload.config import mask_url, parse_url
from tests.support import ROOT, OffloadProcess


def test_defaults_come_from_the_environment_once(monkeypatch: pytest.MonkeyPatch) -> None:
    app = Offload()
    # The default database is beside the module that made the app: this test file.
    assert (app.url.raw, app.namespace) == (f"sqlite:///{Path(__file__).parent / 'offload.db'}", "default")
    monkeypatch.setenv("OFFLOAD_URL", "memory://envtest")
    monkeypatch.setenv("OFFLOAD_NAMESPACE", "stage")
    monkeypatch.setenv("OFFLOAD_RESULTS", "sqlite:///results.db")
    app = Offload()
    assert (app.url.raw, app.namespace) == ("memory://envtest", "stage")
    assert app.results_url.raw == f"sqlite:///{Path.cwd() / 'results.db'}"


def test_a_relative_sqlite_path_is_made_absolute_against_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    app = Offload("sqlite:///var/jobs.db?visibility_timeout=5")
    assert app.url.raw == f"sqlite:///{tmp_path / 'var' / 'jobs.db'}?visibility_timeout=5"
    assert app.url.params == {"visibility_timeout": "5"}


DEFAULT_PATH_SCRIPT = """
from offload import Offload
app = Offload()
"""


def test_a_worker_and_a_web_process_started_from_other_directories_meet_in_the_default_database(
    tmp_path: Path
) -> None:
    # The project's tasks.py creates the app with the default URL; the worker starts from "/"
    # (as systemd does) and the web process from the project: both name the same file, and
    # the worker's "ready" line shows it.
    project = tmp_path / "project"
    project.mkdir()
    (project / "tasks.py").write_text(DEFAULT_PATH_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOAD_")}
    env["PYTHONPATH"] = f"{project}{os.pathsep}{ROOT / 'src'}"
    worker = OffloadProcess(["worker", "tasks:app", "-c", "1"], env, ready_line="worker ready", cwd=Path("/"))
    try:
        ready = worker.wait_for("worker ready")
        assert f"worker ready: sqlite:///{project / 'offload.db'} " in ready
        status = subprocess.run([sys.executable, "-m", "offload", "status", "tasks:app"], cwd=project, env=env,
                                capture_output=True, text=True, timeout=60)
        assert f"on sqlite:///{project / 'offload.db'}" in status.stdout, status.stdout + status.stderr
    finally:
        worker.stop()


def test_password_needing_percent_encoding_gets_an_exact_hint() -> None:
    with pytest.raises(ConfigError) as info:
        Offload("redis://user:p@ss/w0rd@localhost:6379/0")
    message = str(info.value)
    assert "'/' -> %2F" in message and "'@' -> %40" in message
    assert 'urllib.parse.quote(password, safe="")' in message
    assert "p@ss" not in message and "w0rd" not in message


def test_encoded_password_is_decoded() -> None:
    url = parse_url("redis://user:p%40ss%2Fw0rd@localhost:6379/0")
    assert (url.username, url.password, url.host, url.port) == ("user", "p@ss/w0rd", "localhost", 6379)


def test_masking() -> None:
    assert mask_url("amqp://guest:secret@host:5672/vh") == "amqp://guest:***@host:5672/vh"
    assert mask_url("redis://host:6379/0") == "redis://host:6379/0"


def test_amqp_without_results_says_what_to_add() -> None:
    with pytest.raises(ConfigError, match="results='redis://"):
        Offload("amqp://guest:guest@localhost:5672/")


@pytest.mark.parametrize("url", ["nope", "ftp://x", "redis://localhost:notaport/0"])
def test_bad_urls(url: str) -> None:
    with pytest.raises(ConfigError):
        app = Offload(url)
        app._portal.run(app._backends())


def test_bad_namespace() -> None:
    with pytest.raises(ConfigError, match="namespace"):
        Offload("memory://", namespace="a b")


@pytest.mark.parametrize("url", ["redis://u:topsecret@127.0.0.1:1/0", "amqp://u:topsecret@127.0.0.1:1/"])
def test_unreachable_broker_is_broker_unavailable_with_masked_password(url: str) -> None:
    results = "redis://u:topsecret@127.0.0.1:1/0" if url.startswith("amqp") else None
    app = Offload(url, results=results)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable) as info:
        app.ref("x").delay()
    assert time.monotonic() - started < 30
    assert "topsecret" not in str(info.value) and "***" in str(info.value)
    app.close()
