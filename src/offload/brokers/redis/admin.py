"""What operators and housekeeping do to a namespace's queues: dead letters and their replay,
cancel, purge, stats, the look-ahead of burst workers, and flushing. `RedisBroker` hands
these calls to its `QueueAdmin`; each is one script (purge: a few, a chunk at a time).
"""

from __future__ import annotations

from collections.abc import Sequence

from offload.brokers.base import DeadLetter, Delivery, QueueStats
from offload.brokers.redis import argv
from offload.brokers.redis.argv import text
from offload.brokers.redis.connection import Commands
from offload.brokers.redis.keys import Keys, unlink_prefix
from offload.brokers.redis.scripts import Script

__all__ = ["QueueAdmin"]

# Ready messages one purge script removes at most, so a huge queue never blocks the server long.
_PURGE_CHUNK = 1000


class QueueAdmin:
    def __init__(self, commands: Commands, keys: Keys) -> None:
        self._commands = commands
        self._prefix = keys.prefix
        on = [keys.prefix]
        self._dead = Script(commands, "dead", on)
        self._dead_list = Script(commands, "dead_list", on)
        self._replay = Script(commands, "replay", on)
        self._cancel = Script(commands, "cancel", on)
        self._purge_ready = Script(commands, "purge_ready", on)
        self._purge_scheduled = Script(commands, "purge_scheduled", on)
        self._stats = Script(commands, "stats", on)
        self._due_within = Script(commands, "due_within", on)
        #: loaded by the broker's connect, with its own
        self.scripts = [
            self._dead, self._dead_list, self._replay, self._cancel, self._purge_ready,
            self._purge_scheduled, self._stats, self._due_within,
        ]  # fmt: skip

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        await self._dead([delivery.id, argv.receipt(delivery), delivery.queue, delivery.body, reason])

    async def dead_letters(self, limit: int) -> list[DeadLetter]:
        if limit <= 0:
            return []
        return argv.dead_letters(await self._dead_list([limit]))

    async def replay(self, ids: Sequence[str] | None) -> list[DeadLetter]:
        return argv.dead_letters(await self._replay(["1"] if ids is None else ["0", *ids]))

    async def cancel(self, message_id: str) -> bool:
        return bool(await self._cancel([message_id]))

    async def purge(self, queue: str) -> int:
        total = 0
        while True:
            n = int(await self._purge_ready([queue, _PURGE_CHUNK]))
            total += n
            if n < _PURGE_CHUNK:
                break
        return total + int(await self._purge_scheduled([queue]))

    async def stats(self) -> QueueStats:
        reply = await self._stats([])
        out = QueueStats(scheduled=int(reply[0]), running=int(reply[1]), dead=int(reply[2]))
        # (queue, ready count, oldest ready age) triples; the age is '' when no message says.
        for i in range(3, len(reply), 3):
            queue, age = text(reply[i]), text(reply[i + 2])
            out.queued[queue] = int(reply[i + 1])
            if age:
                out.oldest_age_s[queue] = float(age)
        return out

    async def due_within(self, queues: Sequence[str], within_s: float) -> bool:
        if not queues:
            return False
        return bool(await self._due_within([f"{within_s:.6f}", *dict.fromkeys(queues)]))

    async def flush(self) -> None:
        await self._commands.run(lambda c: unlink_prefix(c, self._prefix))
