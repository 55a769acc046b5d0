"""offload: the Redis broker (results in the same database), or RabbitMQ with results in Redis."""

from __future__ import annotations

from pathlib import Path

from benchmarks.peers.base import Peer, Settings, count, timed
from offload import Offload

settings = Settings.from_env()
app = Offload(settings.broker_url, namespace="peersbench", results=settings.redis_url if settings.amqp else None)


@app.task
def incr(n: int) -> int:
    return count(n)


@app.task
def echo(x: int) -> int:
    return x


class OffloadPeer(Peer):
    name = "offload"
    pool = "thread pool, -c 2"
    waiter = "delay().get(), woken by the result store's notification"

    def worker_argv(self, bindir: Path) -> list[str]:
        return [str(bindir / "offload"), "worker", f"{__name__}:app", "-c", "2", "--pool", "thread", "--log-level", "warning"]

    def reset(self) -> None:
        if self.settings.amqp:
            self._flush_amqp()

    def enqueue(self, count: int, n: int) -> None:
        for _ in range(count):
            incr.delay(n)

    def round_trips(self, count: int) -> list[float]:
        def one(i: int) -> None:
            if echo.delay(i).get(timeout=30) != i:
                raise AssertionError("echo returned something else")

        return timed(one, count)

    def cleanup(self) -> None:
        if self.settings.amqp:
            self._flush_amqp()

    def close(self) -> None:
        app.close()

    def _flush_amqp(self) -> None:
        async def flush() -> None:
            await (await app._broker()).flush_namespace()

        app._portal.run(flush())


PEER = OffloadPeer
