"""`offload worker --burst` exits once its queues are done: nothing ready, and nothing scheduled
there that comes due within a second (a retry it has just scheduled is still its work)."""

from __future__ import annotations

import pytest

from offload import Status
from tests.conformance.conftest import Harness
from tests.process_harness import harness

__all__ = ["harness"]


@pytest.mark.parametrize("countdown", [0.6, None], ids=["retry-countdown", "retry-backoff"])
def test_a_burst_worker_stays_for_the_retry_it_scheduled(harness: Harness, countdown: float | None) -> None:
    # Given a task whose first attempt asks for a retry well past one fetch's wait (0.25 s)
    r = harness.task("retries_once").delay(countdown)
    # When a burst worker runs it
    w = harness.worker("--burst")
    # Then the worker exits 0 only after the second attempt succeeded
    assert w.wait(60) == 0, w.output
    state = r.state()
    assert (state.status, state.attempts, state.result) == (Status.SUCCEEDED, 2, 2), w.output
    assert f"retry tests.apps.basic.retries_once[{r.id}]" in w.output
    assert "worker stopped after 2 task(s)" in w.output


def test_a_burst_worker_leaves_a_task_due_later_for_the_next_run(harness: Harness) -> None:
    # Given a task due in a minute, and one ready now
    later = harness.task("add").options(countdown=60).delay(1, 2)
    now = harness.task("add").delay(2, 3)
    # When a burst worker runs
    w = harness.worker("--burst")
    # Then it runs the ready one and exits without waiting for the other
    assert w.wait(30) == 0, w.output
    assert now.status() is Status.SUCCEEDED
    assert later.status() is Status.QUEUED
