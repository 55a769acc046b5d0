"""The built wheel, installed in a fresh virtual environment, runs a task on every broker: the
Lua and SQL the brokers load at run time are shipped as package data, not only present in
the source tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import textwrap
import uuid
from pathlib import Path

import pytest

from tests.conftest import AMQP_URL, REDIS_URL, require_server
from tests.support import ROOT

pytestmark = pytest.mark.slow

TASKS = textwrap.dedent(
    """
    import os

    from offload import Offload

    app = Offload(os.environ["WHEEL_URL"], results=os.environ.get("WHEEL_RESULTS") or None,
                  namespace=os.environ["WHEEL_NAMESPACE"])


    @app.task
    def add(x, y):
        return x + y
    """
)

CHECK = textwrap.dedent(
    """
    import subprocess, sys
    import offload, wheel_tasks

    assert offload.__file__.startswith(sys.prefix), offload.__file__  # the wheel, not the checkout
    worker = subprocess.Popen([sys.executable, "-m", "offload", "worker", "wheel_tasks:app", "--log-level", "warning"])
    try:
        print(wheel_tasks.add.delay(2, 3).get(timeout=30))
    finally:
        worker.terminate()
        worker.wait(30)
    """
)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv holding the wheel built from this checkout; its dependencies come from the test
    environment's site-packages (a path line, which does not bring the editable install along)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(work / "dist"), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    [wheel] = (work / "dist").glob("offload-*.whl")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
                             capture_output=True, text=True, timeout=120)
    assert install.returncode == 0, install.stderr
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "offload_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@pytest.mark.parametrize("kind", ["sqlite", "redis", "amqp"])
def test_the_installed_wheel_runs_a_task(installed: Path, kind: str, tmp_path: Path) -> None:
    require_server(kind)
    url = {"sqlite": f"sqlite:///{tmp_path / 'wheel.db'}", "redis": REDIS_URL, "amqp": AMQP_URL}[kind]
    (tmp_path / "wheel_tasks.py").write_text(TASKS)
    env = {"PATH": "/usr/bin:/bin", "WHEEL_URL": url, "WHEEL_RESULTS": REDIS_URL if kind == "amqp" else "",
           "WHEEL_NAMESPACE": f"wheel{uuid.uuid4().hex[:8]}", "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([str(installed), "-c", CHECK], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "5"
