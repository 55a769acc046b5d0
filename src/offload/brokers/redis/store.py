"""`RedisStore`: task states and their change signals, channels, and the key-value space.

A state is ``state:<id>``; writing it publishes on ``task:<id>`` (with the state itself when it
is final, which saves a watcher the read) and keeps a final state in ``done:<id>`` for the
blocked sync waiters of `RedisDirect`. Watches and channel subscriptions share the store
object's one pub/sub connection, opened on the first of them: a worker only writes states.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from typing import cast

from offload.brokers.base import Store, Watch, ttl_ms
from offload.brokers.redis.argv import history_args, listing, put_states_args, text
from offload.brokers.redis.connection import Commands, connect_bounded, pubsub_client
from offload.brokers.redis.keys import Keys, unlink_prefix
from offload.brokers.redis.pubsub import Flag, Hub
from offload.brokers.redis.scripts import Script, load
from offload.brokers.states import HistoryQuery, StateRow
from offload.config import BrokerURL

__all__ = ["RedisStore"]


class _RedisWatch(Watch):
    """A watch is its own sink: any message on its tasks' channels, or a reconnect, wakes it. A
    message that carries a final state (see ``put_states`` in lib_outcomes.lua) is kept for
    `final_state`."""

    __slots__ = ("_finals", "_flag", "_ids")

    def __init__(self, ids: dict[bytes, str]) -> None:
        self._flag = Flag()
        self._ids = ids  # channel -> task id
        self._finals: dict[str, bytes] = {}

    def deliver(self, channel: bytes, data: bytes) -> None:
        if data:
            self._finals[self._ids[channel]] = data
        self._flag.set()

    def final_state(self, task_id: str) -> bytes | None:
        return self._finals.get(task_id)

    def reset(self) -> None:
        self._flag.set()

    async def wait(self, timeout_s: float) -> bool:
        return await self._flag.wait(timeout_s)


class _ChannelSink:
    __slots__ = ("queue",)

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def deliver(self, channel: bytes, data: bytes) -> None:
        self.queue.put_nowait(data)

    def reset(self) -> None:
        """Pub/sub keeps no history: what was published while disconnected is gone."""


class RedisStore(Store):
    def __init__(self, url: BrokerURL, namespace: str) -> None:
        super().__init__(url, namespace)
        self._keys = Keys.of(namespace)
        self._cmds = Commands(url, namespace)
        self._ps_client = pubsub_client(url, namespace)
        self._hub = Hub(self._ps_client, url.masked)
        on = [self._keys.prefix]
        self._script_put_states = Script(self._cmds, "put_states", on)
        self._script_put_states_if_absent = Script(self._cmds, "put_states_if_absent", on)
        self._script_history = Script(self._cmds, "history", on)
        self._incr = Script(self._cmds, "incr", on)
        self._set_many = Script(self._cmds, "set_many_if_absent", on)
        self._put_states_set_many = Script(self._cmds, "put_states_set_many", on)
        self._workers_put = Script(self._cmds, "workers_put", on)
        self._workers_drop = Script(self._cmds, "workers_drop", on)
        self._workers_list = Script(self._cmds, "workers_list", on)

    async def connect(self) -> None:
        # Workers only write states, so the pub/sub connection opens on the first watch or
        # subscribe; the probe uses the same non-retrying client to stay within its budget.
        async def probe() -> None:
            await self._ps_client.ping()

        await connect_bounded(self.url, probe)
        # The others load themselves on first use.
        await load(self._cmds, [self._script_put_states, self._script_put_states_if_absent, self._incr])

    async def close(self) -> None:
        await self._hub.close()
        await self._ps_client.aclose()
        await self._cmds.close()

    async def _put_states(self, states: Sequence[StateRow], ttl_s: float | None, final: Collection[str]) -> None:
        # One script rather than a pipeline: the same single round trip, and the states and
        # their change signals are written together.
        await self._script_put_states(put_states_args(states, ttl_s, final))

    async def _put_states_if_absent(self, states: Sequence[StateRow], ttl_s: float | None) -> None:
        args = [ttl_ms(ttl_s) or 0, *(v for row in states for v in (row.id, row.data, listing(row.listing)))]
        await self._script_put_states_if_absent(args)

    async def _history(self, query: HistoryQuery) -> list[tuple[str, bytes]]:
        reply = await self._script_history(history_args(query))
        return [(text(reply[i]), reply[i + 1]) for i in range(0, len(reply), 2)]

    async def get_states(self, task_ids: Sequence[str]) -> list[bytes | None]:
        if not task_ids:
            return []
        keys = [self._keys.state(t) for t in task_ids]
        values = await self._cmds.run(lambda c: c.mget(keys))
        return cast("list[bytes | None]", values)

    async def _start_hub(self) -> None:
        if not self._hub.started:
            await connect_bounded(self.url, self._hub.start)

    @asynccontextmanager
    async def watch(self, task_ids: Sequence[str]) -> AsyncIterator[Watch]:
        await self._start_hub()
        ids = {self._keys.task_channel(t): t for t in task_ids}
        watch = _RedisWatch(ids)
        channels = list(ids)
        await self._hub.add(channels, watch)
        try:
            yield watch
        finally:
            self._hub.remove(channels, watch)

    async def publish(self, channel: str, data: bytes) -> None:
        name = self._keys.channel(channel)
        await self._cmds.run(lambda c: c.publish(name, data))

    @asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[AsyncIterator[bytes]]:
        await self._start_hub()
        sink = _ChannelSink()
        channels = [self._keys.channel(channel).encode()]
        await self._hub.add(channels, sink)

        async def messages() -> AsyncIterator[bytes]:
            while True:
                yield await sink.queue.get()

        try:
            yield messages()
        finally:
            self._hub.remove(channels, sink)

    async def set_if_absent(self, key: str, value: bytes, ttl_s: float | None = None) -> bool:
        k, px = self._keys.value(key), ttl_ms(ttl_s)
        return bool(await self._cmds.run(lambda c: c.set(k, value, nx=True, px=px)))

    async def set_many_if_absent(self, items: Sequence[tuple[str, bytes]], ttl_s: float | None = None) -> list[bytes | None]:
        if not items:
            return []
        # One script: one round trip for all the keys (the script loads itself on first use).
        keys = [self._keys.value(k) for k, _ in items]
        args: list[bytes | int] = [ttl_ms(ttl_s) or 0, *(v for _, v in items)]
        return cast("list[bytes | None]", await self._set_many(args, keys=keys))

    async def put_states_and_set_many_if_absent(
        self,
        states: Sequence[StateRow],
        ttl_s: float | None,
        final: Collection[str],
        items: Sequence[tuple[str, bytes]],
        items_ttl_s: float | None = None,
    ) -> list[bytes | None]:
        ttl, done_ttl, *quadruples = put_states_args(states, ttl_s, final)
        args = [ttl, done_ttl, len(states), *quadruples, ttl_ms(items_ttl_s) or 0]
        args += [v for key, value in items for v in (key, value)]
        # One script: the states and the keys in one round trip.
        held = await self._put_states_set_many(args)
        return cast("list[bytes | None]", held)

    async def get_value(self, key: str) -> bytes | None:
        k = self._keys.value(key)
        value = await self._cmds.run(lambda c: c.get(k))
        return cast("bytes | None", value)

    async def delete_value(self, key: str) -> None:
        k = self._keys.value(key)
        await self._cmds.run(lambda c: c.delete(k))

    async def incr(self, key: str, amount: int = 1, ttl_s: float | None = None) -> int:
        args = [int(amount), ttl_ms(ttl_s) or 0]
        return int(await self._incr(args, keys=[self._keys.value(key)]))

    # -- the worker registry: a hash of records and their deadlines in a sorted set --------
    async def put_worker(self, worker_id: str, record: bytes, ttl_s: float) -> None:
        await self._workers_put([worker_id, record, max(int(ttl_s * 1000), 1)])

    async def drop_worker(self, worker_id: str) -> None:
        await self._workers_drop([worker_id])

    async def workers(self) -> list[bytes]:
        return cast("list[bytes]", await self._workers_list([]))

    async def flush_namespace(self) -> None:
        await self._cmds.run(lambda c: unlink_prefix(c, self._keys.prefix))
