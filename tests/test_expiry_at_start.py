"""A task that waits for a place (a thread, an async slot, a child process) past its expiry
never runs: it ends expired, even though it had not expired when the worker received it."""

from __future__ import annotations

import pytest

from offload import Status, TaskExpired
from tests.conformance.conftest import Harness
from tests.process_harness import dead_reasons, harness
from tests.support import wait_until

__all__ = ["harness"]


@pytest.mark.parametrize(
    ("pool", "long_task", "late_task"),
    [("thread", "touch_then_sleep", "record"), ("async", "async_touch_then_sleep", "record"),
     ("async", "async_touch_then_sleep", "async_add"), ("process", "touch_then_sleep", "record")],
)
def test_a_task_that_waits_past_its_expiry_never_runs(harness: Harness, pool: str, long_task: str, late_task: str) -> None:
    # Given a worker with one place, busy for 3 s
    w = harness.worker("--pool", pool, "-c", "1", "--prefetch", "1")
    marker, log = harness.tmp_path / "started", harness.tmp_path / "executions"
    long = harness.task(long_task).delay(str(marker), 3.0)
    wait_until(marker.exists, 20, "the long task's start")
    # When a task that expires in 1 s is received (not yet expired) and waits for the place
    late_call = harness.task(late_task).options(expires=1.0)
    late = late_call.delay(str(log), "late") if late_task == "record" else late_call.delay(1, 2)
    w.wait_for(f"received tests.apps.basic.{late_task}[{late.id}]")
    # Then it ends expired, dead-lettered, and never ran
    with pytest.raises(TaskExpired):
        late.get(timeout=20)
    assert late.status() is Status.EXPIRED
    assert late.state().started_at is None
    assert long.get(timeout=20) == "slept"
    assert not log.exists()
    wait_until(lambda: late.id in dead_reasons(harness), 20, "the dead letter")
    assert dead_reasons(harness)[late.id] == "expired: not started before its expiry time"
    assert harness.task("add").delay(1, 1).get(timeout=20) == 2
