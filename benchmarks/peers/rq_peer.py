"""RQ: Redis only. One `rq worker` runs one job at a time, so two cores' worth is its worker pool."""

from __future__ import annotations

from pathlib import Path

from redis import Redis
from rq import Queue

from benchmarks.peers.base import QUEUE, Peer, Settings, count, timed

settings = Settings.from_env()


def incr(n: int) -> int:
    return count(n)


def echo(x: int) -> int:
    return x


class RQPeer(Peer):
    name = "rq"
    pool = "worker-pool -n 2, SimpleWorker (no fork per job)"
    waiter = "job.latest_result(timeout=) (blocking stream read)"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.queue = Queue(QUEUE, connection=Redis.from_url(settings.redis_url))

    def worker_argv(self, bindir: Path) -> list[str]:
        # The default Worker forks a work horse for every job; SimpleWorker runs jobs in the
        # worker process itself, which is RQ's documented way to avoid that cost.
        return [
            str(bindir / "rq"), "worker-pool", QUEUE, "-n", "2", "-w", "rq.worker.SimpleWorker",
            "--url", self.settings.redis_url, "--logging-level", "WARNING",
        ]

    def enqueue(self, count: int, n: int) -> None:
        for _ in range(count):
            self.queue.enqueue(incr, n)

    def round_trips(self, count: int) -> list[float]:
        def one(i: int) -> None:
            result = self.queue.enqueue(echo, i).latest_result(timeout=30)
            if result is None or result.return_value != i:
                raise AssertionError("echo returned something else")

        return timed(one, count)

    def close(self) -> None:
        self.queue.connection.close()


PEER = RQPeer
