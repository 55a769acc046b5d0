"""The Lua scripts of ``lua/``: their text, read once from the package, and `Script`, the typed
handle that runs one.

Each ``lua/<name>.lua`` is one script, except the ``lib_*.lua`` libraries: functions several
scripts share, put in front of a script's own text (`LIBRARIES` says which a script needs).
Every file opens with a comment saying its KEYS, its ARGV and what it returns. KEYS[1] is the
namespace prefix for every script but ``incr`` and ``set_many_if_absent``, whose KEYS are the
keys they set. Scripts read the server's clock (``TIME``), so that lease deadlines do not
depend on the clocks of the machines running workers, and every one of them is safe to run
twice, so that a command retried after a dropped connection loses nothing.
"""

from __future__ import annotations

import functools
import importlib.resources
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from offload.brokers.redis.connection import Commands

__all__ = ["LIBRARIES", "Arg", "Script", "ScriptName", "load", "source"]

ScriptName = Literal[
    "ack", "cancel", "claim", "dead", "dead_list", "due_within", "enqueue", "extend", "history", "incr",
    "purge_ready", "purge_scheduled", "put_states", "put_states_if_absent", "put_states_set_many",
    "replay", "requeue", "set_many_if_absent", "settle", "stats", "workers_drop", "workers_list", "workers_put",
]  # fmt: skip
#: What ARGV holds: Redis receives every argument as a string.
Arg = str | bytes | int | float

_COMMON = ("lib_common",)
_HISTORY = ("lib_common", "lib_history")
_OUTCOMES = ("lib_common", "lib_history", "lib_outcomes")
#: The libraries each script runs after, in order.
LIBRARIES: dict[ScriptName, tuple[str, ...]] = {
    "ack": _OUTCOMES,
    "cancel": _COMMON,
    "claim": ("lib_common", "lib_claim"),
    "dead": _COMMON,
    "dead_list": _COMMON,
    "due_within": _COMMON,
    "enqueue": _HISTORY,
    "extend": _COMMON,
    "history": _HISTORY,
    "incr": (),
    "purge_ready": _COMMON,
    "purge_scheduled": _COMMON,
    "put_states": _OUTCOMES,
    "put_states_if_absent": _HISTORY,
    "put_states_set_many": _OUTCOMES,
    "replay": _COMMON,
    "requeue": _COMMON,
    "set_many_if_absent": (),
    "settle": (*_OUTCOMES, "lib_claim"),
    "stats": _COMMON,
    "workers_drop": (),
    "workers_list": (),
    "workers_put": (),
}


@functools.cache
def _files() -> dict[str, str]:
    """Every ``lua/*.lua`` of the package, by name without the suffix, read on first use."""
    folder = importlib.resources.files(__package__).joinpath("lua")
    return {
        entry.name.removesuffix(".lua"): entry.read_text(encoding="utf-8")
        for entry in folder.iterdir()
        if entry.name.endswith(".lua")
    }


@functools.cache
def source(name: ScriptName) -> str:
    """The text sent to the server for a script: its libraries, then its own file."""
    files = _files()
    return "\n".join(files[part] for part in (*LIBRARIES[name], name))


class Script:
    """A script registered with a `Commands`; awaiting a call runs it (one EVALSHA, loading
    it again when the server has forgotten it)."""

    __slots__ = ("_commands", "_keys", "registered")

    def __init__(self, commands: Commands, name: ScriptName, keys: list[str]) -> None:
        self._commands = commands
        self._keys = keys  # the usual KEYS: the namespace prefix
        self.registered: AsyncScript = commands.pool.register_script(source(name))

    async def __call__(self, args: Sequence[Arg], keys: list[str] | None = None) -> Any:
        return await self._commands.script(self.registered, self._keys if keys is None else keys, args)


async def load(commands: Commands, scripts: Iterable[Script]) -> None:
    """Send the scripts to the server in one go, so that the first calls need no second round
    trip; a server that forgets them later (a restart) gets each again on its next call."""
    texts = [s.registered.script for s in scripts]

    async def load_all(client: Redis) -> None:
        for text in texts:
            await client.script_load(text)

    await commands.run(load_all)
