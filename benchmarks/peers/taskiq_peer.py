"""taskiq: taskiq-redis's stream broker (the one with acknowledgements) and its result backend."""

from __future__ import annotations

from pathlib import Path

from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

from benchmarks.peers.base import QUEUE, AsyncPeer, Settings, acount

settings = Settings.from_env()
#: wait_result() polls; its default of 0.2 s would measure the poll, not the library.
POLL_S = 0.005

broker = RedisStreamBroker(url=settings.redis_url, queue_name=QUEUE).with_result_backend(
    RedisAsyncResultBackend(redis_url=settings.redis_url)
)


@broker.task
async def incr(n: int) -> int:
    return await acount(n)


@broker.task
async def echo(x: int) -> int:
    return x


class TaskiqPeer(AsyncPeer):
    name = "taskiq"
    pool = "--workers 1, asyncio (max 100 tasks in flight, the default)"
    waiter = f"wait_result(check_interval={POLL_S})"

    _started = False

    def worker_argv(self, bindir: Path) -> list[str]:
        return [str(bindir / "taskiq"), "worker", f"{__name__}:broker", "--workers", "1", "--log-level", "WARNING"]

    async def start(self) -> None:
        # Creates the stream's consumer group before the first message, so a worker started
        # later reads every message enqueued before it.
        if not self._started:
            await broker.startup()
            self._started = True

    async def aenqueue(self, count: int, n: int) -> None:
        await self.start()
        for _ in range(count):
            await incr.kiq(n)

    async def around_trips(self, count: int) -> list[float]:
        await self.start()
        out = []
        for i in range(count):
            t0 = self._loop.time()
            task = await echo.kiq(i)
            result = await task.wait_result(check_interval=POLL_S, timeout=30)
            if result.return_value != i:
                raise AssertionError("echo returned something else")
            out.append((self._loop.time() - t0) * 1000)
        return out

    async def aclose(self) -> None:
        if self._started:
            await broker.shutdown()


PEER = TaskiqPeer
