"""The `offload` command, run as a user runs it: `python -m offload ...` in a subprocess."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from offload import Offload, admin
from tests.support import OffloadProcess, env_for, run_cli, start_worker

APP = "tests.apps.basic:app"


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'cli.db'}"


@pytest.fixture
def ns() -> str:
    return f"cli{uuid.uuid4().hex[:8]}"


def test_every_command_has_help() -> None:
    for command in ("worker", "beat", "gateway", "send", "status", "purge", "dead"):
        out = run_cli("memory://", "x", command, "--help")
        assert out.returncode == 0 and "Usage:" in out.stdout, command
        assert "Example" in out.stdout, f"{command} --help shows no example"


def test_send_status_purge(url: str, ns: str) -> None:
    sent = run_cli(url, ns, "send", APP, "tests.apps.basic.add", "[1, 2]", "-q", "images")
    assert sent.returncode == 0, sent.stderr
    task_id = sent.stdout.strip()
    status = run_cli(url, ns, "status", APP)
    assert status.stdout.splitlines() == [
        f"namespace {ns} on {url}",
        "  queue images                      1",
        "  running                           0",
        "  scheduled                         0",
        "  dead (failed, expired, malformed)        0",
        "workers: none live",
    ]
    one = run_cli(url, ns, "status", APP, task_id)
    fields = dict(line.split(None, 1) for line in one.stdout.splitlines())
    queued_at = dt.datetime.fromisoformat(fields.pop("queued_at"))
    assert fields == {"id": task_id, "name": "tests.apps.basic.add", "status": "queued", "progress": "None",
                      "message": "None", "attempts": "0", "started_at": "None", "finished_at": "None"}
    assert abs(dt.datetime.now(dt.UTC) - queued_at) < dt.timedelta(minutes=5)
    purged = run_cli(url, ns, "purge", APP, "images", "--yes")
    assert purged.stdout.strip() == "removed 1 task(s) from images"


def test_send_and_wait_prints_the_result(url: str, ns: str) -> None:
    worker = start_worker(url, ns)
    try:
        out = run_cli(url, ns, "send", APP, "tests.apps.basic.progress_steps", "[3, 0.05]", "--wait", "--timeout", "30")
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines()[-1] == "3"
        failed = run_cli(url, ns, "send", APP, "tests.apps.basic.fail", '["no paper"]', "--wait", "--timeout", "30")
        assert failed.returncode == 1
        assert failed.stderr.strip() == "offload: error: task failed: ValueError: no paper"
    finally:
        worker.stop()


def test_dead_letters_listed_and_replayed(url: str, ns: str) -> None:
    worker = start_worker(url, ns)
    try:
        task_id = run_cli(url, ns, "send", APP, "tests.apps.basic.fail", '["boom"]', "--wait").stdout.split()[0]
        listed = run_cli(url, ns, "dead", APP)
        assert task_id in listed.stdout and "failed: ValueError: boom" in listed.stdout
        replayed = run_cli(url, ns, "dead", APP, "--replay", task_id)
        assert replayed.stdout.strip() == "replayed 1 task(s)"
        worker.wait_for(f"failed tests.apps.basic.fail[{task_id}]", count=2)
        assert run_cli(url, ns, "dead", APP, "--replay", "nope").returncode == 2
    finally:
        worker.stop()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["status", "no_such_module:app"], "cannot import 'no_such_module'"),
        (["status", "tests.apps.basic:nothing"], "has no attribute 'nothing'"),
        (["send", APP, "x.y", "[1,"], "not valid JSON"),
        (["status", APP, "unknown-id"], "unknown task id"),
    ],
)
def test_user_mistakes_are_one_line(url: str, ns: str, args: list[str], message: str) -> None:
    out = run_cli(url, ns, *args)
    assert out.returncode == 2
    assert message in out.stderr
    # One line, or click's usage block ending in one "Error:" line for a malformed command line.
    assert "Traceback" not in out.stderr
    assert message in out.stderr.strip().splitlines()[-1]


def test_unreachable_broker_is_one_line_with_masked_password(ns: str) -> None:
    out = run_cli("redis://me:hunter2@127.0.0.1:1/0", ns, "status", APP)
    assert out.returncode == 69
    assert "broker unavailable" in out.stderr and "hunter2" not in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ('{"x": 1}', "ARGS must be a JSON list of positional arguments, got '{\"x\": 1}'; keywords go in --kwargs"),
        ("5", "ARGS must be a JSON list of positional arguments, got '5'"),
    ],
)
def test_send_refuses_args_that_are_not_a_list(url: str, ns: str, args: str, message: str) -> None:
    out = run_cli(url, ns, "send", APP, "tests.apps.basic.add", args)
    assert out.returncode == 2
    assert message in out.stderr.strip().splitlines()[-1]
    assert _waiting(url, ns) == 0


def test_send_refuses_a_task_the_app_does_not_register(url: str, ns: str) -> None:
    out = run_cli(url, ns, "send", APP, "tests.apps.basic.addd", "[1, 2]")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].endswith(
        "tests.apps.basic:app registers no task named 'tests.apps.basic.addd'; did you mean tests.apps.basic.add? "
        "(--unregistered sends it anyway)"
    )
    assert _waiting(url, ns) == 0
    # A task whose code lives only on the workers is sent when asked to.
    sent = run_cli(url, ns, "send", APP, "elsewhere.only_on_workers", "[]", "--unregistered")
    assert sent.returncode == 0, sent.stderr
    assert _waiting(url, ns) == 1


def _waiting(url: str, ns: str) -> int:
    app = Offload(url, namespace=ns)
    try:
        return sum(app._portal.run(admin.status(app)).queued.values())
    finally:
        app.close()


BROKEN_MODULES = {
    "syntax": ("def nightly(:\n    pass\n", "SyntaxError", "line 1"),
    "missing_dependency": ("import offload\nimport no_such_dependency_xyz\n", "No module named 'no_such_dependency_xyz'", "line 2"),
    "raises": ("import offload\n\nraise RuntimeError('settings missing')\n", "RuntimeError: settings missing", "line 3"),
}
EVERY_COMMAND = [
    ["worker", "{app}"], ["beat", "{app}"], ["gateway", "{app}", "--port", "0"], ["send", "{app}", "x.y", "[]"],
    ["status", "{app}"], ["purge", "{app}", "default", "--yes"], ["dead", "{app}"],
]


def run_in(directory: Path, url: str, ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "offload", *args], cwd=directory, env=env_for(url, ns),
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("broken", sorted(BROKEN_MODULES))
def test_an_app_module_that_fails_to_import_is_one_line_from_every_command(broken: str, tmp_path: Path, url: str, ns: str) -> None:
    source, error, where = BROKEN_MODULES[broken]
    (tmp_path / f"{broken}_tasks.py").write_text(source)
    for command in EVERY_COMMAND:
        args = [a.format(app=f"{broken}_tasks:app") for a in command]
        out = run_in(tmp_path, url, ns, *args)
        assert out.returncode == 2, (args, out.stderr)
        assert "Traceback" not in out.stderr, args
        [line] = out.stderr.strip().splitlines()
        assert line.startswith(f"offload: error: cannot import '{broken}_tasks': "), line
        assert error in line and where in line, line


TASKS_WITH_A_FACTORY = """\
import pathlib
from offload import Offload, admin

app = Offload()

@app.task
def nightly_cleanup():
    pathlib.Path("cleaned").write_text("ran")

def wipe():
    pathlib.Path("wiped").write_text("ran")

def make_app():
    return app

def make_nothing():
    return 42
"""


@pytest.mark.parametrize(
    ("attribute", "message"),
    [
        ("nightly_cleanup", "is the task 'tasks.nightly_cleanup', not an app"),
        ("wipe", "not an offload.Offload app; to build the app by calling it, write 'tasks:wipe()'"),
        ("nightly_cleanup()", "names a Task, not a function that returns an offload.Offload app"),
        ("make_nothing()", "the app factory 'tasks:make_nothing()' returned 42, not an offload.Offload app"),
    ],
)
def test_an_app_path_naming_a_task_or_a_plain_function_never_calls_it(attribute: str, message: str, tmp_path: Path, url: str, ns: str) -> None:
    (tmp_path / "tasks.py").write_text(TASKS_WITH_A_FACTORY)
    for command in ("status", "worker"):
        out = run_in(tmp_path, url, ns, command, f"tasks:{attribute}", *(["--burst"] if command == "worker" else []))
        assert out.returncode == 2, out.stderr
        [line] = out.stderr.strip().splitlines()
        assert message in line, line
    assert not (tmp_path / "cleaned").exists() and not (tmp_path / "wiped").exists()


def test_an_app_factory_named_with_parentheses_is_called(tmp_path: Path, url: str, ns: str) -> None:
    (tmp_path / "tasks.py").write_text(TASKS_WITH_A_FACTORY)
    out = run_in(tmp_path, url, ns, "status", "tasks:make_app()")
    assert out.returncode == 0, out.stderr
    assert f"namespace {ns}" in out.stdout


SCRIPT = """\
from offload import Offload, admin

app = Offload()


@app.task
def double(x):
    return 2 * x


if __name__ == "__main__":
    print(double.name)
    print(double.delay(21).id)
"""


@pytest.mark.parametrize(
    ("run", "module"),
    [(["tasks.py"], "tasks"), (["-m", "tasks"], "tasks"), (["shop/tasks.py"], "shop.tasks"), (["-m", "shop.tasks"], "shop.tasks")],
)
def test_tasks_sent_by_a_script_run_directly_are_named_for_the_module_a_worker_imports(
    run: list[str], module: str, tmp_path: Path, url: str, ns: str,
) -> None:
    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "__init__.py").write_text("")
    for folder in (tmp_path, tmp_path / "shop"):
        (folder / "tasks.py").write_text(SCRIPT)
    sent = subprocess.run([sys.executable, *run], cwd=tmp_path, env=env_for(url, ns), capture_output=True, text=True, timeout=60)
    assert sent.returncode == 0, sent.stderr
    name, task_id = sent.stdout.split()
    worker = OffloadProcess(["worker", f"{module}:app"], env_for(url, ns), ready_line="worker ready", cwd=tmp_path)
    try:
        app = Offload(url, namespace=ns)
        assert app.result(task_id).get(timeout=30) == 42
        app.close()
    finally:
        worker.stop()
    assert name == f"{module}.double"
