"""A pool of child processes for CPU-bound sync tasks (Pillow, CSV, parsing).

Children are started with ``spawn``: they import the app from its ``module:attribute`` spec and
open their own connections, so nothing (event loop, socket, sqlite handle) crosses a fork. The
parent talks to each child over a pipe, watched by the event loop. A child that runs past
``time_limit`` or whose task is cancelled is killed and replaced; with
``max_tasks_per_child`` a child exits after that many tasks and a fresh one takes its place.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import pickle
import signal
import time
from multiprocessing.connection import Connection
from typing import Any

from offload.errors import ConfigError
from offload.hooks import call_each_sync
from offload.loading import load_app
from offload.worker.child import run_in_child
from offload.worker.executors import Job, limit_message
from offload.worker.heap import freeze_startup_heap
from offload.worker.outcome import Outcome

log = logging.getLogger("offload.worker")
_CTX = mp.get_context("spawn")
START_TIMEOUT_S = 60.0


class _Child:
    def __init__(self, process: mp.process.BaseProcess, conn: Connection) -> None:
        self.process = process
        self.conn = conn
        self.task_id: str | None = None
        self.reply: asyncio.Future[tuple[Any, ...]] | None = None
        self.killed_for: str | None = None  # "timeout" | "cancelled" | "shutdown"


class ProcessRunner:
    def __init__(self, app_spec: str, concurrency: int, max_tasks_per_child: int | None = None) -> None:
        self.app_spec = app_spec
        self.concurrency = concurrency
        self.max_tasks_per_child = max_tasks_per_child
        self._idle: asyncio.Queue[_Child] = asyncio.Queue()
        self._children: set[_Child] = set()
        self._closing = False

    async def start(self) -> None:
        await asyncio.gather(*(self._spawn() for _ in range(self.concurrency)))

    async def _spawn(self) -> None:
        parent_end, child_end = _CTX.Pipe()
        process = _CTX.Process(
            target=child_main, args=(self.app_spec, child_end, self.max_tasks_per_child, logging.getLogger().level),
            name="offload-child", daemon=True,
        )
        await asyncio.get_running_loop().run_in_executor(None, process.start)
        child_end.close()
        child = _Child(process, parent_end)
        self._children.add(child)
        child.reply = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().add_reader(parent_end.fileno(), self._on_readable, child)
        try:
            first = await asyncio.wait_for(asyncio.shield(child.reply), START_TIMEOUT_S)
        except TimeoutError:
            first = ("error", "child did not start in time")
        if first[0] != "ready":
            self._forget(child)
            raise ConfigError(f"worker child failed to start: {first[1]}")
        log.debug("child %s ready", process.pid)
        child.reply = None
        self._idle.put_nowait(child)

    def _on_readable(self, child: _Child) -> None:
        try:
            message = child.conn.recv()
        except (EOFError, OSError):
            message = ("lost", child.process.exitcode)
            asyncio.get_running_loop().remove_reader(child.conn.fileno())
        if child.reply is not None and not child.reply.done():
            child.reply.set_result(message)

    def _forget(self, child: _Child) -> None:
        self._children.discard(child)
        try:
            asyncio.get_running_loop().remove_reader(child.conn.fileno())
        except (ValueError, OSError):
            pass
        child.conn.close()
        if child.process.is_alive():
            child.process.kill()
        child.process.join(timeout=5)

    async def _replace(self, child: _Child) -> None:
        self._forget(child)
        if not self._closing:
            await self._spawn()

    async def run(self, job: Job) -> Outcome:
        child = await self._idle.get()
        env = job.env
        child.task_id = env.id
        child.killed_for = None
        child.reply = asyncio.get_running_loop().create_future()
        payload = (env.name, env.args, env.kwargs, env.id, env.attempt, env.headers, env.soft_time_limit, job.state_record)
        try:
            child.conn.send(("run", payload))
        except (OSError, pickle.PicklingError) as e:
            await self._replace(child)
            return Outcome("error", exc_type=type(e).__name__, message=f"could not hand the task to a child: {e}")
        done, _ = await asyncio.wait({child.reply}, timeout=env.time_limit)
        if not done:
            child.killed_for = "timeout"
            child.process.kill()
            await asyncio.wait({child.reply}, timeout=5)
            await self._replace(child)
            return Outcome("timeout", exc_type="TaskTimeLimit", message=limit_message(env, env.time_limit))
        reply = child.reply.result()
        child.task_id = None
        if reply[0] == "lost":
            killed_for = child.killed_for
            await self._replace(child)
            if killed_for == "cancelled":
                return Outcome("cancelled", exc_type="TaskCancelled", message="cancelled")
            if killed_for == "shutdown":
                return Outcome("lost", exc_type="WorkerShutdown", message="stopped by worker shutdown")
            return Outcome("lost", exc_type="WorkerLost", message=f"the child process died (exit code {reply[1]})")
        outcome: Outcome = reply[1]
        if len(reply) > 2 and reply[2] == "exiting":
            asyncio.get_running_loop().create_task(self._replace(child))
        else:
            child.reply = None
            self._idle.put_nowait(child)
        return outcome

    def cancel(self, task_id: str, reason: str = "cancelled") -> bool:
        for child in self._children:
            if child.task_id == task_id:
                child.killed_for = reason
                child.process.kill()
                return True
        return False

    def kill_all(self) -> None:
        """At the end of a shutdown's grace period: stop what still runs."""
        for child in list(self._children):
            if child.task_id is not None:
                self.cancel(child.task_id, "shutdown")

    async def close(self) -> None:
        self._closing = True
        for child in list(self._children):
            try:
                child.conn.send(("stop",))
            except OSError:
                pass
        deadline = time.monotonic() + 5
        for child in list(self._children):
            await asyncio.get_running_loop().run_in_executor(None, child.process.join, max(deadline - time.monotonic(), 0.1))
            self._forget(child)


def child_main(app_spec: str, conn: Connection, max_tasks: int | None, log_level: int) -> None:
    """Entry point of a child process."""
    # The parent coordinates shutdown; Ctrl-C in a terminal reaches the whole process group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level or logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app = load_app(app_spec)
        call_each_sync(app.worker_start_hooks)
        freeze_startup_heap()
    except BaseException as e:
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", os.getpid()))

    done = 0
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if message[0] == "stop":
            return
        outcome = run_in_child(app, *message[1])
        done += 1
        last = max_tasks is not None and done >= max_tasks
        try:
            conn.send(("done", outcome, "exiting") if last else ("done", outcome))
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            conn.send(("done", Outcome("error", exc_type="SerializationError", message=f"result cannot leave the child: {e}")))
        if last:
            return
