"""Every error offload raises at a user is an OffloadError; those that were builtins before
still are (an unknown task id is also a LookupError)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

import offload
from offload import Offload, OffloadError
from offload import admin as admin_api
from offload.context import TaskContext, current, reset_context, set_context
from offload.errors import InvalidArgument, NotAWorkflow, UnknownTask, UsageError
from tests.conftest import urls_for

KINDS = ["memory", "sqlite"]


@pytest.fixture(params=KINDS)
def app(request: pytest.FixtureRequest, tmp_path: Path, namespace: str) -> Iterator[Offload]:
    url, _ = urls_for(request.param, tmp_path)
    app = Offload(url, namespace=namespace)
    yield app
    app.close()


def test_every_exported_error_is_under_the_root_but_the_in_task_signal() -> None:
    exported = [getattr(offload, n) for n in offload.__all__]
    errors = {e for e in exported if isinstance(e, type) and issubclass(e, BaseException)}
    assert {UnknownTask, NotAWorkflow, InvalidArgument, UsageError} <= errors
    assert {e for e in errors if not issubclass(e, OffloadError)} == {offload.SoftTimeLimitExceeded}


def test_an_unknown_task_id_is_an_offload_error_and_a_lookup_error(app: Offload) -> None:
    result = app.result("never-enqueued")
    for read in (result.state, result.status, lambda: result.get(timeout=5)):
        with pytest.raises(UnknownTask, match="unknown task id 'never-enqueued'") as info:
            read()
        assert isinstance(info.value, OffloadError) and isinstance(info.value, LookupError)
        assert info.value.task_id == "never-enqueued"


def test_following_an_unknown_task_is_an_unknown_task(app: Offload) -> None:
    async def follow() -> None:
        async for _ in admin_api.follow(app, "never-enqueued", timeout=5):
            pass

    with pytest.raises(UnknownTask):
        app._portal.run(follow())


def test_members_of_a_plain_task_are_not_a_workflow(app: Offload) -> None:
    task_id = app.send("tests.apps.basic.add", 1, 2).id
    with pytest.raises(NotAWorkflow, match="is a task, not a workflow") as info:
        app.workflow(task_id).children()
    assert isinstance(info.value, OffloadError) and isinstance(info.value, LookupError)


def test_progress_out_of_range_is_an_invalid_argument() -> None:
    token = set_context(TaskContext("t1", "pkg.task", 1, {}, lambda fraction, message: None, lambda channel, data: None))
    try:
        with pytest.raises(InvalidArgument, match="between 0 and 1") as info:
            current.progress(1.5)
    finally:
        reset_context(token)
    assert isinstance(info.value, OffloadError) and isinstance(info.value, ValueError)


def test_a_blocking_call_inside_offloads_own_loop_is_a_usage_error() -> None:
    app = Offload("memory://")

    async def nested() -> None:
        app.publish("news", 1)  # the sync face, called on the loop that serves it

    try:
        with pytest.raises(UsageError, match="use the async form") as info:
            app._portal.run(nested())
    finally:
        app.close()
    assert isinstance(info.value, OffloadError) and isinstance(info.value, RuntimeError)
    asyncio.run(asyncio.sleep(0))  # the test's own loop is unaffected


def test_stopping_a_worker_that_is_not_running_is_a_usage_error() -> None:
    from offload.worker.consumer import Worker
    from offload.worker.threads import TaskThreads

    worker = Worker(Offload("memory://"), handle_signals=False)
    with pytest.raises(UsageError, match="the worker is not running"):
        worker.stop()
    threads = TaskThreads(1)
    threads.close()
    with pytest.raises(UsageError, match="the task threads are closed"):
        threads.submit(lambda: None)
