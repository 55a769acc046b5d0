"""Starting again in a forked child, whether or not the fork ran Python's fork hooks.

A thread, an event loop, a connection or a socket made before a fork belongs to the parent: the
child has none of the threads and must not share the sockets. ``os.fork()`` runs the hooks of
`os.register_at_fork`, but a server that forks from C does not (uWSGI's prefork without
``lazy-apps``, anything calling ``libc.fork()``): its children would wait forever on a loop thread
that does not exist there. So each place that keeps such things registers here with
`after_fork`, and the entry points that use them call `check`, which compares the process id
with the one the state belongs to and, in a child, runs every registered function once, first.

Registered functions run in the order they were registered. They are held strongly, as
`os.register_at_fork` holds its hooks: an app lives as long as the process, and is never
collected with connections still open on a loop that has gone.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["after_fork", "check"]

_callbacks: list[Callable[[], Any]] = []
_owner_pid = os.getpid()
# One lock per process id, made on demand: a lock made in the parent may have been held by one
# of its threads at the fork and would never be released in the child. dict.setdefault is atomic.
_locks: dict[int, threading.Lock] = {}


def after_fork(fn: Callable[[], Any]) -> None:
    """Call ``fn`` in a forked child before offload uses anything made in the parent."""
    _callbacks.append(fn)


def check() -> None:
    """In a process forked since the last check, run the `after_fork` functions (once)."""
    pid = os.getpid()
    if pid == _owner_pid:
        return
    _start_again(pid)


def _start_again(pid: int) -> None:
    global _owner_pid
    with _locks.setdefault(pid, threading.Lock()):
        if _owner_pid == pid:
            return  # another thread of this child did it
        for fn in list(_callbacks):
            fn()
        _owner_pid = pid
        for other in [p for p in _locks if p != pid]:
            _locks.pop(other, None)


os.register_at_fork(after_in_child=check)
