"""Several workers on several queues: with nobody crashing, every task runs exactly once."""

from __future__ import annotations

import asyncio
import collections

import pytest

from offload.result import wait_states
from tests.conformance.conftest import Harness

TASKS = 5000


@pytest.mark.slow
def test_four_workers_two_queues_5000_tasks_each_exactly_once(harness: Harness) -> None:
    if harness.kind not in ("redis", "amqp", "sqlite"):
        pytest.skip("several worker processes share a networked (or on-disk) broker")
    logs = {q: harness.tmp_path / f"{q}.log" for q in ("images", "exports")}
    # Given two workers per queue, all four in separate processes
    for queue in logs:
        harness.worker("-q", queue, "-c", "4")
        harness.worker("-q", queue, "-c", "4")

    # When 5,000 tasks are sent, half to each queue
    async def send_and_wait() -> list[str]:
        record = {q: harness.task("record").options(queue=q) for q in logs}
        ids = []
        for i in range(TASKS):
            queue = "images" if i % 2 else "exports"
            ids.append((await record[queue].adelay(str(logs[queue]), f"t{i}")).id)
        for start in range(0, TASKS, 500):
            await wait_states(harness.app, ids[start:start + 500], timeout=120)
        return ids

    ids = harness.app._portal.run(asyncio.wait_for(send_and_wait(), 300))

    # Then each ran exactly once, on a worker of its own queue, and every worker took part
    states = harness.app._portal.run(harness.app._read_states(ids))
    assert all(s is not None and s.status.value == "succeeded" for s in states)
    for queue, path in logs.items():
        counts = collections.Counter(path.read_text().split())
        expected = {f"t{i}" for i in range(TASKS) if (i % 2 == 1) == (queue == "images")}
        assert set(counts) == expected
        assert set(counts.values()) == {1}, [t for t, n in counts.items() if n > 1][:10]
    for w in harness.workers:
        w.stop()
        assert "succeeded tests.apps.basic.record" in w.output, "a worker ran nothing"
