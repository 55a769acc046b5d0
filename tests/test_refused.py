"""A message a worker refuses for its signature never runs, and its sender hears so at once:
its task ends FAILED with MessageRefused instead of staying queued. Real worker processes."""

from __future__ import annotations

import time

import pytest

from offload import Status, TaskFailed
from tests.conformance.conftest import Harness
from tests.process_harness import dead_reasons, harness, inject
from tests.support import wait_until

__all__ = ["harness"]


@pytest.mark.parametrize(
    ("worker_secret", "sender_secret", "cause"),
    [
        ("a", "b", "bad signature: the message was tampered with or signed with another secret"),
        ("a", None, "unsigned message refused: this app requires signed messages"),
        (None, "b", "message is signed but this app has no secret to check it"),
    ],
    ids=["other-secret", "unsigned", "worker-without-secret"],
)
def test_a_refused_message_fails_its_task_at_once(
    harness: Harness, worker_secret: str | None, sender_secret: str | None, cause: str
) -> None:
    harness.worker(extra_env={"OFFLOAD_TEST_SECRET": worker_secret} if worker_secret else None)
    sender = harness.make_app(secret=sender_secret)
    try:
        r = sender.ref("tests.apps.basic.add").delay(1, 2)
        sent = time.monotonic()
        with pytest.raises(TaskFailed) as failed:
            r.get(timeout=15)
        assert time.monotonic() - sent < 5
        assert failed.value.exc_type == "MessageRefused"
        assert failed.value.message == f"the worker refused the message: {cause} (the sender and the workers must share one secret)"
        assert r.status() is Status.FAILED
        wait_until(lambda: r.id in dead_reasons(harness), 20, "the dead letter")
        assert dead_reasons(harness)[r.id] == f"rejected: {cause}"
    finally:
        sender.close()


def test_a_refused_message_leaves_the_state_of_a_task_that_ran(harness: Harness) -> None:
    """Someone who can write to the broker but has no secret sends a message under the id of a
    task that already ended: it is refused, and the task keeps its outcome."""
    signed = harness.make_app(secret="a")
    try:
        harness.worker(extra_env={"OFFLOAD_TEST_SECRET": "a"})
        done = signed.ref("tests.apps.basic.add").delay(1, 2)
        assert done.get(timeout=20) == 3
        forged = harness.app.build("tests.apps.basic.add", (2, 2), {}, harness.task("add").opts, done.id)
        inject(harness, harness.app.codec.encode(forged), done.id)
        wait_until(lambda: done.id in dead_reasons(harness), 20, "the dead letter")
        assert done.status() is Status.SUCCEEDED
        assert done.get(timeout=1) == 3
    finally:
        signed.close()
