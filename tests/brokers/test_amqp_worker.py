"""A worker on RabbitMQ starts a message before the claim that guards it against cancellation
has come back (`Delivery.admitted`): the claim's round trip overlaps with starting the task. A
cancel that got there first still keeps the task from running, and a claim that fails (the
results store stops answering) puts the message back, to run once later."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from offload import Offload
from offload.brokers.redis import connection as redis_connection
from tests.conftest import AMQP_URL, REDIS_URL, require_server
from tests.support import flush_namespace, thread_worker


@pytest.fixture
def app(namespace: str) -> Iterator[tuple[Offload, Any, Any]]:
    require_server("amqp")
    require_server("redis")
    from tests.apps import basic

    made = Offload(AMQP_URL, namespace=namespace, results=REDIS_URL)
    record = made.task(name="tests.apps.basic.record")(basic.record.fn)
    add = made.task(name="tests.apps.basic.add")(basic.add.fn)
    try:
        yield made, record, add
    finally:
        made._portal.run(flush_namespace(made))
        made.close()


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_a_cancelled_message_handed_out_early_never_runs(app: tuple[Offload, Any, Any], tmp_path: Path) -> None:
    made, record, _ = app
    ran = tmp_path / "ran"
    cancelled = record.delay(str(ran), "cancelled")
    cancelled.cancel()
    worker = thread_worker(made, concurrency=2)
    try:
        assert record.delay(str(ran), "kept").get(timeout=20) == "kept"
        assert cancelled.status() == "cancelled"
    finally:
        worker.stop()
    assert _lines(ran) == ["kept"]


def test_a_claim_that_fails_puts_the_message_back(
    app: tuple[Offload, Any, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    made, record, add = app
    ran = tmp_path / "ran"
    operator = redis.Redis.from_url(REDIS_URL)
    worker = thread_worker(made, concurrency=2)
    try:
        assert add.delay(1, 2).get(timeout=20) == 3  # every connection is open
        with caplog.at_level(logging.WARNING, logger="offload.brokers.amqp"):
            # Sent (and its QUEUED state stored) before the pause, it reaches the worker 0.2 s
            # later, back from the delay levels, while the pause holds the worker's claim.
            result = record.options(countdown=0.2).delay(str(ran), "once")
            # The worker's store gives up on a command after 50 ms; Redis holds writes for 400.
            monkeypatch.setattr(redis_connection, "OPERATION_TIMEOUT_S", 0.05)
            operator.execute_command("CLIENT", "PAUSE", 400, "WRITE")
            assert result.get(timeout=20) == "once"
        assert any("claiming 1 message(s) failed" in r.getMessage() for r in caplog.records)
    finally:
        monkeypatch.undo()
        worker.stop()
        operator.close()
    assert _lines(ran) == ["once"]
