"""The deployment recipes of deploy/ (docs/deploy.md): the systemd units verify, every
supervisor stops a worker later than the worker's own grace period ends, and a real
supervisord runs, restarts (after kill -9) and gracefully stops workers from its recipe."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from offload import Offload
from tests.conftest import require_module, require_program
from tests.support import ROOT

DEPLOY = ROOT / "deploy"
UNITS = sorted((DEPLOY / "systemd").glob("offload-*@.*"))
GRACE = re.compile(r"--grace[ =](\d+(?:\.\d+)?)")


def unit_sections(path: Path) -> dict[str, dict[str, str]]:
    """A systemd unit file as {section: {key: value}} (the last value of a repeated key)."""
    parser = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return {name: dict(parser[name]) for name in parser.sections()}


def grace_of(command: str) -> float:
    found = GRACE.search(command)
    assert found is not None, f"no --grace in {command!r}: the stop timeout cannot be checked against it"
    return float(found[1])


def test_the_recipes_are_all_there() -> None:
    names = {p.name for p in UNITS}
    assert {"offload-worker@.service", "offload-beat@.service", "offload-gateway@.service",
            "offload-ping@.service", "offload-ping@.timer"} <= names
    for recipe in ("supervisord.conf", "Procfile", "Dockerfile", "kubernetes/worker.yaml"):
        assert (DEPLOY / recipe).is_file(), recipe


def test_the_systemd_units_verify(tmp_path: Path) -> None:
    # Given the units, pointed at this machine's offload and an instance's environment file
    offload = Path(sys.executable).with_name("offload")
    assert offload.is_file(), offload
    shutil.copy(DEPLOY / "systemd" / "shop1.env", tmp_path / "shop1.env")
    instances = []
    for unit in UNITS:
        text = (unit.read_text().replace("/srv/offload/venv/bin/offload", str(offload))
                .replace("/etc/offload/%i.env", str(tmp_path / "%i.env")).replace("/srv/offload", str(tmp_path))
                .replace("User=offload", "User=root").replace("Group=offload", "Group=root"))
        instance = tmp_path / unit.name.replace("@.", "@shop1.")
        instance.write_text(text)
        instances.append(str(instance))
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        # Where systemd cannot run, the units are at least parsed and their commands checked.
        for path in instances:
            service = unit_sections(Path(path)).get("Service", {})
            if "ExecStart" in service:
                assert Path(service["ExecStart"].split()[0]).is_file(), service["ExecStart"]
        return
    # Then systemd finds nothing wrong with them (unknown keys, bad values, missing programs)
    done = subprocess.run([analyze, "verify", *instances], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Unknown" not in done.stderr and "Failed" not in done.stderr, done.stderr


def test_every_supervisor_waits_longer_than_the_workers_grace() -> None:
    # systemd: TimeoutStopSec above the worker's --grace, and SIGTERM to the worker alone
    worker = unit_sections(DEPLOY / "systemd" / "offload-worker@.service")["Service"]
    assert float(worker["TimeoutStopSec"]) > grace_of(worker["ExecStart"])
    assert worker["KillSignal"] == "SIGTERM" and worker["KillMode"] == "mixed"
    gateway = unit_sections(DEPLOY / "systemd" / "offload-gateway@.service")["Service"]
    assert float(gateway["TimeoutStopSec"]) > grace_of(gateway["ExecStart"])
    # supervisord: stopwaitsecs above --grace
    conf = configparser.ConfigParser(interpolation=None)
    conf.read(DEPLOY / "supervisord.conf")
    program = conf["program:offload-worker"]
    assert float(program["stopwaitsecs"]) > grace_of(program["command"])
    assert program["stopsignal"] == "TERM"
    # Kubernetes: terminationGracePeriodSeconds above --grace
    yaml = require_module("yaml", "pip install pyyaml")
    deployment = next(d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "worker.yaml").read_text()) if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > grace_of(" ".join(pod["containers"][0]["command"]))
    assert "offload ping" in " ".join(pod["containers"][0]["livenessProbe"]["exec"]["command"])


class Supervisord:
    """A real supervisord running deploy/supervisord.conf's worker program, in a directory of its own."""

    def __init__(self, tmp: Path, url: str, namespace: str) -> None:
        self.tmp = tmp
        conf = (DEPLOY / "supervisord.conf").read_text()
        conf = conf.replace("/var/log/offload", str(tmp)).replace("/run/offload", str(tmp))
        # Only the workers: the beat is not under test here.
        conf = conf[: conf.index("[program:offload-beat]")]
        (tmp / "supervisord.conf").write_text(conf)
        env = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOAD_")}
        env.update(OFFLOAD_VENV=str(Path(sys.executable).parent.parent), OFFLOAD_APP="tests.apps.basic:app",
                   OFFLOAD_QUEUES="default", OFFLOAD_HOME=str(ROOT), OFFLOAD_URL=url, OFFLOAD_NAMESPACE=namespace,
                   PYTHONPATH=os.pathsep.join((str(ROOT / "src"), str(ROOT))))
        self.env = env
        self.proc = subprocess.Popen([require_program("supervisord", "pip install supervisor"), "-n", "-c", str(tmp / "supervisord.conf")],
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def ctl(self, *args: str) -> str:
        done = subprocess.run([require_program("supervisorctl", "pip install supervisor"), "-c", str(self.tmp / "supervisord.conf"), *args],
                              env=self.env, capture_output=True, text=True, timeout=60)
        return done.stdout

    def pids(self) -> dict[str, int]:
        """The workers RUNNING now, by process name."""
        running = {}
        for line in self.ctl("status").splitlines():
            found = re.match(r"(\S+)\s+RUNNING\s+pid (\d+)", line)
            if found:
                running[found[1]] = int(found[2])
        return running

    def wait_for_pids(self, count: int, timeout: float = 60, other_than: frozenset[int] = frozenset()) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = self.pids()
            if len(pids) == count and not set(pids.values()) & other_than:
                return pids
            time.sleep(0.2)
        raise AssertionError(f"{count} workers not RUNNING within {timeout} s:\n{self.ctl('status')}")

    def log(self) -> str:
        return (self.tmp / "supervisord.log").read_text()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture
def supervisord(tmp_path: Path, namespace: str) -> Iterator[tuple[Supervisord, Offload]]:
    url = f"sqlite:///{tmp_path / 'offload.db'}"
    app = Offload(url, namespace=namespace)
    sup = Supervisord(tmp_path, url, namespace)
    try:
        yield sup, app
    finally:
        sup.close()
        app.close()


def test_supervisord_restarts_a_killed_worker_and_stops_them_gracefully(supervisord: tuple[Supervisord, Offload], tmp_path: Path) -> None:
    sup, app = supervisord
    # Given supervisord's two workers, serving
    first = sup.wait_for_pids(2)
    assert app.ref("tests.apps.basic.add").delay(2, 3).get(timeout=30) == 5
    # When one is killed with SIGKILL
    victim = first["offload-worker:offload-worker-0"]
    os.kill(victim, signal.SIGKILL)
    # Then supervisord starts it again, and the pair still serves
    sup.wait_for_pids(2, other_than=frozenset({victim}))
    assert app.ref("tests.apps.basic.add").delay(4, 5).get(timeout=30) == 9
    # When they are stopped while a task runs
    marker = tmp_path / "started"
    slow = app.ref("tests.apps.basic.touch_then_sleep").delay(str(marker), 2.0)
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert time.monotonic() < deadline, "the slow task never started"
        time.sleep(0.05)
    stopped = sup.ctl("stop", "offload-worker:*")
    # Then the running task finished within the grace period and both workers exited 0 on SIGTERM
    assert slow.get(timeout=5) == "slept"
    assert stopped.count("stopped") == 2, stopped
    assert not sup.pids()
    clean = re.findall(r"stopped: (offload-worker-\d) \(exit status 0\)", sup.log())
    assert sorted(clean) == ["offload-worker-0", "offload-worker-1"], sup.log()
