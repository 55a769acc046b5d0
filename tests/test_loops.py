"""offload's own loops run on uvloop when it is installed, on asyncio's loop when asked, and a
name that is neither is refused with one line."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from offload import Offload
from offload.errors import ConfigError
from offload.loops import loop_factory, loop_kind
from tests.conftest import require_module
from tests.support import run_cli, start_worker

uvloop = require_module("uvloop", "pip install 'offload[fast]'")


def test_auto_picks_uvloop_when_it_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OFFLOAD_LOOP", raising=False)
    loop = loop_factory()()
    try:
        assert isinstance(loop, uvloop.Loop)
        assert loop_kind(loop) == "uvloop"
    finally:
        loop.close()


def test_the_environment_or_the_caller_chooses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFFLOAD_LOOP", "asyncio")
    assert loop_factory() is asyncio.new_event_loop
    for name, kind in (("asyncio", "asyncio"), ("uvloop", "uvloop"), ("auto", "uvloop")):
        loop = loop_factory(name)()
        try:
            assert loop_kind(loop) == kind
        finally:
            loop.close()


def test_an_unknown_loop_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFFLOAD_LOOP", "tokio")
    with pytest.raises(ConfigError, match="unknown event loop 'tokio': use one of auto, asyncio, uvloop"):
        loop_factory()


@pytest.mark.parametrize(("args", "expected"), [((), "uvloop"), (("--loop", "asyncio"), "asyncio")])
def test_a_worker_runs_its_tasks_on_the_loop_chosen(tmp_path: Path, namespace: str, args: tuple[str, ...], expected: str) -> None:
    url = f"sqlite:///{tmp_path / 'offload.db'}"
    worker = start_worker(url, namespace, *args, "-c", "2")
    app = Offload(url, namespace=namespace)
    try:
        assert app.ref("tests.apps.basic.loop_kind").delay().get(timeout=30) == expected
        # The sync face's own loop, in this process, is uvloop too.
        assert loop_kind(app._portal.loop) == "uvloop"
    finally:
        worker.stop()
        app.close()


def test_the_worker_command_refuses_an_unknown_loop(tmp_path: Path, namespace: str) -> None:
    done = run_cli(f"sqlite:///{tmp_path / 'offload.db'}", namespace, "worker", "tests.apps.basic:app", "--loop", "tokio")
    assert done.returncode == 2
    assert "Invalid value for '--loop'" in done.stderr
