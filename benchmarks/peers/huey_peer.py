"""Huey: RedisHuey with its result store."""

from __future__ import annotations

from pathlib import Path

from huey import RedisHuey

from benchmarks.peers.base import QUEUE, Peer, Settings, count, timed

settings = Settings.from_env()
# notify_result: a blocking get() waits on BLPOP instead of polling with backoff from 50 ms.
huey = RedisHuey(QUEUE, url=settings.redis_url, notify_result=True)


@huey.task()
def incr(n: int) -> int:
    return count(n)


@huey.task()
def echo(x: int) -> int:
    return x


class HueyPeer(Peer):
    name = "huey"
    pool = "-w 2 -k thread"
    waiter = "result.get(blocking=True), notify_result=True (BLPOP)"

    def worker_argv(self, bindir: Path) -> list[str]:
        # -n: no periodic tasks to check; -q: warnings only, like every other worker here.
        return [str(bindir / "huey_consumer"), f"{__name__}.huey", "-w", "2", "-k", "thread", "-n", "-q"]

    def enqueue(self, count: int, n: int) -> None:
        for _ in range(count):
            incr(n)

    def round_trips(self, count: int) -> list[float]:
        def one(i: int) -> None:
            if echo(i).get(blocking=True, timeout=30) != i:
                raise AssertionError("echo returned something else")

        return timed(one, count)


PEER = HueyPeer
