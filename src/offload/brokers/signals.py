"""Topic signals that wake coroutines on any event loop or thread of this process.

A signal carries no data, only "something under this topic may have changed": the woken code
re-reads the real state. This is what lets `fetch`, `watch` and `subscribe` sleep without
polling on the memory and sqlite backends (sqlite feeds it from other processes through
`offload.brokers.sqlite.notify`).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable


class Listener:
    """One coroutine's interest in some topics. Not reentrant: one waiter at a time."""

    def __init__(self, hub: Signals, topics: frozenset[str]) -> None:
        self._hub = hub
        self.topics = topics
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()

    def _fire(self) -> None:
        # Called from any thread.
        if self._loop.is_closed():
            return
        try:
            self._loop.call_soon_threadsafe(self._event.set)
        except RuntimeError:  # loop closed between the check and the call
            pass

    async def wait(self, timeout_s: float) -> bool:
        """True when signalled since the last wait (or during this one), False on timeout."""
        if not self._event.is_set():
            try:
                await asyncio.wait_for(self._event.wait(), timeout_s)
            except TimeoutError:
                return False
        self._event.clear()
        return True

    def close(self) -> None:
        self._hub._remove(self)

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Signals:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_topic: dict[str, set[Listener]] = {}

    def listen(self, topics: Iterable[str]) -> Listener:
        listener = Listener(self, frozenset(topics))
        with self._lock:
            for topic in listener.topics:
                self._by_topic.setdefault(topic, set()).add(listener)
        return listener

    def _remove(self, listener: Listener) -> None:
        with self._lock:
            for topic in listener.topics:
                group = self._by_topic.get(topic)
                if group is not None:
                    group.discard(listener)
                    if not group:
                        del self._by_topic[topic]

    def notify(self, topics: Iterable[str]) -> None:
        with self._lock:
            targets = {listener for t in topics for listener in self._by_topic.get(t, ())}
        for listener in targets:
            listener._fire()
