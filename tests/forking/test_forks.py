"""Processes forked without Python's fork hooks (uWSGI's prefork, ``libc.fork()``) after offload
was used: each child starts its own loop thread and connections instead of waiting forever on
the parent's."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_program, require_server, urls_for
from tests.support import ROOT, OffloadProcess, env_for, free_port, start_worker

KINDS = ["sqlite", "redis"]

CHILD_SENDS_AFTER_A_RAW_FORK = textwrap.dedent("""
    import ctypes, json, os, signal, sys
    from tests.apps.basic import add, app
    add.delay(1, 1).get(timeout=10)      # the loop thread and the connections exist now
    pid = ctypes.CDLL(None).fork()        # a fork that runs no os.register_at_fork hook
    if pid == 0:
        signal.alarm(20)                  # a hang ends the child instead of the test
        value = add.delay(2, 3).get(timeout=10)
        os._exit(0 if value == 5 else 3)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"child": os.waitstatus_to_exitcode(status), "parent": add.delay(3, 4).get(timeout=10)}))
""")


@pytest.fixture(params=KINDS)
def urls(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str | None]:
    require_server(request.param)
    return urls_for(request.param, tmp_path)


@pytest.fixture
def worker(urls: tuple[str, str | None], namespace: str) -> Iterator[OffloadProcess]:
    url, results = urls
    proc = start_worker(url, namespace, "-c", "4", results=results)
    try:
        yield proc
    finally:
        proc.stop()


def test_a_child_of_a_raw_fork_sends_and_gets_results(
    urls: tuple[str, str | None], namespace: str, worker: OffloadProcess
) -> None:
    url, results = urls
    done = subprocess.run([sys.executable, "-c", CHILD_SENDS_AFTER_A_RAW_FORK], cwd=ROOT, env=env_for(url, namespace, results),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # -signal.SIGALRM (-14) when the child hung on the parent's loop thread.
    assert json.loads(done.stdout) == {"child": 0, "parent": 7}


def _get(port: int) -> tuple[int, dict[str, int]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


@pytest.mark.slow
def test_uwsgi_prefork_without_lazy_apps_answers_every_request(
    urls: tuple[str, str | None], namespace: str, worker: OffloadProcess, tmp_path: Path
) -> None:
    uwsgi = require_program("uwsgi", "pip install uwsgi")
    url, results = urls
    port = free_port()
    # The spooler tutorial's configuration: four processes of two threads, the app loaded once in
    # the master and forked (no lazy-apps), harakiri as the only rescue from a hang.
    ini = tmp_path / "uwsgi.ini"
    ini.write_text(textwrap.dedent(f"""
        [uwsgi]
        http-socket = 127.0.0.1:{port}
        module = tests.forking.forking_site:application
        chdir = {ROOT}
        master = true
        processes = 4
        threads = 2
        harakiri = 20
        die-on-term = true
        need-app = true
    """))
    # uWSGI embeds the interpreter it was built against; VIRTUAL_ENV gives it this venv's packages.
    env = env_for(url, namespace, results, VIRTUAL_ENV=str(Path(sys.executable).parent.parent))
    server = subprocess.Popen([uwsgi, "--ini", str(ini)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert server.poll() is None, server.communicate()[0]
                assert time.monotonic() < deadline, "uwsgi never listened"
                time.sleep(0.05)
        answers = [_get(port) for _ in range(40)]
        assert [status for status, _ in answers] == [200] * 40
        assert {body["value"] for _, body in answers} == {5}
        # Answered by the forked workers, not by the master that imported the app.
        assert server.pid not in {body["pid"] for _, body in answers}
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)
