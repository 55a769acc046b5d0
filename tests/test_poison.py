"""Messages a worker cannot handle end in the dead letters, with the reason, and the worker
serves on: a malformed envelope once, a message the worker itself keeps failing on after a few
tries. Real worker processes on sqlite, Redis and RabbitMQ."""

from __future__ import annotations

import json
from typing import Any

import pytest

from offload import Status, TaskFailed
from offload.message import MAGIC, VERSION
from offload.serializers import JSONSerializer
from tests.conformance.conftest import Harness
from tests.process_harness import dead_reasons, harness, inject, start_app_worker
from tests.support import wait_until

__all__ = ["harness"]

# (field, value) pairs a sender with a bug or a hostile one could put in an envelope.
POISON: list[tuple[str, Any]] = [
    ("args", 5), ("args", None), ("kwargs", [1, 2]), ("kwargs", "x=1"),
    ("headers", [1]), ("headers", "owner"), ("queued_at", "now"), ("queued_at", float("nan")),
    ("expires", "soon"), ("eta", "later"), ("time_limit", "10"), ("soft_time_limit", "5"),
    ("time_limit", True), ("priority", 99), ("priority", 1.5), ("attempt", 0), ("attempt", "1"),
    ("retries", -1), ("retry_backoff", float("inf")), ("id", 7), ("name", None),
]


def _body(fields: dict[str, Any]) -> bytes:
    """Offload's framing around a JSON payload, unsigned, as the worker expects: only the
    envelope inside is wrong. NaN and infinity are written as Python's JSON writes them."""
    return MAGIC + bytes((VERSION, JSONSerializer.code)) + json.dumps(fields, allow_nan=True).encode()


def test_malformed_envelopes_are_dead_lettered_once_naming_the_field(harness: Harness) -> None:
    add = harness.task("add")
    w = harness.worker("-c", "2")
    poisoned: dict[str, str] = {}
    for i, (name, value) in enumerate(POISON):
        message_id = f"poison{i:02d}"
        fields = harness.app.build(add.name, (1, 2), {}, add.opts, message_id).to_dict()
        fields[name] = value
        inject(harness, _body(fields), message_id)
        poisoned[message_id] = name
    assert add.delay(1, 2).get(timeout=30) == 3  # the worker serves on
    wait_until(lambda: set(poisoned) <= set(dead_reasons(harness)), 30, "every poisoned message dead-lettered")
    reasons = dead_reasons(harness)
    for message_id, name in poisoned.items():
        assert reasons[message_id].startswith(f"malformed: bad envelope field {name!r}"), reasons[message_id]
        # Its task ended failed (never STARTED, as one with a string time_limit used to stay).
        state = harness.app.result(message_id).state()
        assert state.status is Status.FAILED and state.error is not None
        assert state.error["type"] == "MessageMalformed"
        assert state.error["message"] == f"the worker could not read the message: {reasons[message_id].removeprefix('malformed: ')}"
    # Each was handled once: refused at decoding, never put back to come round again.
    for message_id in poisoned:
        handled = [line for line in w.lines if message_id in line]
        assert len(handled) == 1, handled
    assert "internal error" not in w.output
    assert add.delay(2, 2).get(timeout=30) == 4


def test_a_message_the_worker_keeps_failing_on_ends_failed_in_the_dead_letters(harness: Harness) -> None:
    w = start_app_worker(harness, "tests.apps.misbehaving:app")
    broken = harness.app.ref("tests.apps.misbehaving.broken_by_hook").delay()
    with pytest.raises(TaskFailed) as failed:
        broken.get(timeout=30)
    assert failed.value.exc_type == "InternalError"
    assert "RuntimeError: the admission hook is broken" in failed.value.message
    # The state is stored first, then the message is dead-lettered.
    wait_until(lambda: broken.id in dead_reasons(harness), 20, "the dead letter")
    reason = dead_reasons(harness)[broken.id]
    assert reason == "failed: InternalError: RuntimeError: the admission hook is broken"
    assert harness.app.ref("tests.apps.misbehaving.add").delay(1, 2).get(timeout=30) == 3
    assert len([line for line in w.lines if "internal error while handling message" in line]) == 2
    assert len([line for line in w.lines if f"dead-lettered message {broken.id} after 3 internal errors" in line]) == 1
