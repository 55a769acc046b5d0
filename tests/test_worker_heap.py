"""A worker that owns its process takes its start-up heap out of the garbage collector's walks,
in the process pool's children too; a worker run in a thread leaves the host program's heap alone."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from offload import Offload
from tests.apps import basic
from tests.support import start_worker, thread_worker


@pytest.mark.parametrize("pool", ["thread", "process"])
def test_a_worker_process_freezes_its_startup_heap(tmp_path: Path, namespace: str, pool: str) -> None:
    url = f"sqlite:///{tmp_path / 'offload.db'}"
    worker = start_worker(url, namespace, "--pool", pool, "-c", "1")
    app = Offload(url, namespace=namespace)
    try:
        # Modules, the app and its connections: thousands of objects, not a handful.
        assert app.ref("tests.apps.basic.frozen_objects").delay().get(timeout=30) > 10_000
    finally:
        worker.stop()
        app.close()


def test_a_worker_in_a_thread_leaves_the_heap_alone() -> None:
    app = Offload("memory://heap", namespace="heap")
    app.registry["frozen"] = type(basic.frozen_objects)(app, basic.frozen_objects.fn, "frozen", basic.frozen_objects.opts)
    runner = thread_worker(app)
    try:
        assert app.ref("frozen").delay().get(timeout=10) == 0
        assert gc.get_freeze_count() == 0
    finally:
        runner.stop()
