"""The sqlite backend across real processes: wake-ups, exclusive claims, crash recovery,
schema creation races, and the notifier's directory of sockets.

Child processes are started with ``spawn`` (never a fork of the test runner with its threads),
except in the one test about fork safety. Nothing sleeps and hopes: every wait is on an event,
a queue or a condition, with a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import socket
import sqlite3
import threading
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from multiprocessing.context import SpawnProcess
from pathlib import Path
from typing import Any

import pytest

from offload.brokers import make_broker, make_store
from offload.brokers.base import Broker, OutgoingMessage, Store
from offload.brokers.signals import Listener
from offload.brokers.sqlite import SqliteBroker, SqliteStore, database_path, notify, queries
from offload.brokers.sqlite.connection import SCHEMA_VERSION, connect
from offload.brokers.sqlite.database import noop
from offload.brokers.states import HistoryQuery, Listing, StateRow
from offload.config import parse_url
from offload.errors import BrokerUnavailable, ConfigError

SPAWN = multiprocessing.get_context("spawn")
# Far beyond every wait below: a child woken in time was woken by the notifier, not by its
# safety poll.
NO_SAFETY_POLL_S = 60.0


def msg(queue: str = "default", body: bytes | None = None) -> OutgoingMessage:
    mid = uuid.uuid4().hex
    return OutgoingMessage(id=mid, queue=queue, body=body or mid.encode())


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'offload.db'}"


@pytest.fixture
async def broker(url: str, namespace: str) -> AsyncIterator[SqliteBroker]:
    b = make_broker(parse_url(url), namespace)
    assert isinstance(b, SqliteBroker)
    await b.connect()
    try:
        yield b
    finally:
        await b.close()


@pytest.fixture
async def store(url: str, namespace: str) -> AsyncIterator[SqliteStore]:
    s = make_store(parse_url(url), namespace)
    assert isinstance(s, SqliteStore)
    await s.connect()
    try:
        yield s
    finally:
        await s.close()


@contextlib.contextmanager
def child(target: Callable[..., None], *args: Any) -> Iterator[SpawnProcess]:
    proc = SPAWN.Process(target=target, args=args, daemon=True)
    proc.start()
    try:
        yield proc
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(10)


def notify_dir(url: str) -> Path:
    return Path(notify.notify_dir(database_path(parse_url(url))))


def sockets_of(pid: int, directory: Path) -> list[str]:
    return [n for n in os.listdir(directory) if n.startswith(f"{pid}-")] if directory.exists() else []


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Poll a state that changes with no notice to this process (a file another process binds,
    a queue the code under test fills), until it holds; fail at the deadline naming it."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        await asyncio.sleep(0.01)


# -- children (module level, so that spawn can import them) -----------------------------------


async def _open_broker(url: str, ns: str) -> Broker:
    broker = make_broker(parse_url(url), ns)
    await broker.connect()
    return broker


async def _open_store(url: str, ns: str) -> Store:
    store = make_store(parse_url(url), ns)
    await store.connect()
    return store


def child_watch(url: str, ns: str, task_id: str, ready: Any, out: Any) -> None:
    notify.SAFETY_POLL_S = NO_SAFETY_POLL_S

    async def main() -> None:
        store = await _open_store(url, ns)
        try:
            async with store.watch([task_id]) as watch:
                ready.set()
                woke = await watch.wait(30)
                woke_at = time.time()
                out.put((woke, woke_at, await store.get_state(task_id)))
        finally:
            await store.close()

    asyncio.run(main())


def child_fetch_one(url: str, ns: str, ready: Any, out: Any) -> None:
    notify.SAFETY_POLL_S = NO_SAFETY_POLL_S
    wait = Listener.wait

    async def say_ready_then_wait(self: Listener, timeout_s: float) -> bool:
        ready.set()  # the fetch found nothing and waits: only a wake-up can bring the message now
        return await wait(self, timeout_s)

    async def main() -> None:
        broker = await _open_broker(url, ns)
        assert isinstance(broker, SqliteBroker)
        try:
            Listener.wait = say_ready_then_wait  # type: ignore[method-assign]
            got = await broker.fetch(["default"], 1, timeout_s=30)
            out.put(([d.id for d in got], time.time()))
        finally:
            await broker.close()

    asyncio.run(main())


def child_drain(url: str, ns: str, start: Any, out: Any) -> None:
    async def main() -> None:
        broker = await _open_broker(url, ns)
        seen: list[str] = []
        try:
            start.wait(30)  # both connected: start together
            while True:
                batch = await broker.fetch(["default"], 3, timeout_s=0.5)
                if not batch:
                    break
                seen += [d.id for d in batch]
                await broker.ack(batch)
        finally:
            await broker.close()
        out.put(seen)

    asyncio.run(main())


def child_lease_and_hang(url: str, ns: str, out: Any) -> None:
    async def main() -> None:
        broker = await _open_broker(url, ns)
        got = await broker.fetch(["default"], 1, timeout_s=30)
        out.put([(d.id, d.deliveries) for d in got])
        await asyncio.Event().wait()  # hold the lease until killed

    asyncio.run(main())


def child_create_schema(url: str, ns: str, start: Any, out: Any) -> None:
    async def main() -> None:
        start.wait(30)  # every child is up: all open the fresh file at the same moment
        broker = make_broker(parse_url(url), ns)
        store = make_store(parse_url(url), ns)
        try:
            await asyncio.gather(broker.connect(), store.connect())
            await broker.enqueue(msg())
            await store.put_states([(uuid.uuid4().hex, b"s")])
            out.put("ok")
        except Exception as e:
            out.put(f"{type(e).__name__}: {e}")
        finally:
            await broker.close()
            await store.close()

    asyncio.run(main())


# -- across processes ------------------------------------------------------------------------


async def test_a_waiter_in_another_process_is_woken_by_the_notifier(url: str, namespace: str, store: SqliteStore) -> None:
    ready, out = SPAWN.Event(), SPAWN.Queue()
    with child(child_watch, url, namespace, "task-1", ready, out) as proc:
        assert await asyncio.to_thread(ready.wait, 30), "child did not start watching"
        sent_at = time.time()
        await store.put_states([("task-1", b"done")])
        woke, woke_at, state = await asyncio.to_thread(out.get, True, 30)
        proc.join(10)
    assert woke is True and state == b"done"
    # The notifier's budget is well under a millisecond; this bound only has to tell a
    # wake-up from the (disabled) safety poll on a busy machine.
    assert woke_at - sent_at < 0.5


async def test_a_fetch_in_another_process_is_woken_by_enqueue(url: str, namespace: str, broker: SqliteBroker) -> None:
    ready, out = SPAWN.Event(), SPAWN.Queue()
    with child(child_fetch_one, url, namespace, ready, out) as proc:
        assert await asyncio.to_thread(ready.wait, 30), "the child's fetch never waited"
        m = msg()
        sent_at = time.time()
        await broker.enqueue(m)
        ids, got_at = await asyncio.to_thread(out.get, True, 30)
        proc.join(10)
    assert ids == [m.id]
    assert got_at - sent_at < 0.5


async def test_two_processes_never_claim_the_same_message(url: str, namespace: str, broker: SqliteBroker) -> None:
    ids = {(await broker.enqueue(msg())) for _ in range(1000)}
    start, out = SPAWN.Barrier(2), SPAWN.Queue()
    with child(child_drain, url, namespace, start, out) as a, child(child_drain, url, namespace, start, out) as b:
        first = await asyncio.to_thread(out.get, True, 60)
        second = await asyncio.to_thread(out.get, True, 60)
        a.join(10)
        b.join(10)
    assert len(first) + len(second) == 1000
    assert set(first).isdisjoint(second)
    assert set(first) | set(second) == ids
    assert first and second, "one process got nothing: the test did not exercise concurrency"


async def test_a_lease_held_by_a_killed_process_comes_back(tmp_path: Path, namespace: str) -> None:
    url = f"sqlite:///{tmp_path / 'offload.db'}?visibility_timeout=2"
    broker = await _open_broker(url, namespace)
    try:
        m = msg()
        await broker.enqueue(m)
        out = SPAWN.Queue()
        with child(child_lease_and_hang, url, namespace, out) as proc:
            assert await asyncio.to_thread(out.get, True, 30) == [(m.id, 1)]
            assert await broker.fetch(["default"], 1, timeout_s=0.1) == []  # still leased
            assert proc.pid is not None
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(10)
            dead_pid = proc.pid
        # No reaper process: the lease simply runs out, and the waiting fetch wakes for it.
        [again] = await broker.fetch(["default"], 1, timeout_s=10)
        assert (again.id, again.deliveries) == (m.id, 2)
        # The killed process left its socket behind; the next publisher removes it.
        directory = notify_dir(url)
        assert dead_pid is not None and sockets_of(dead_pid, directory)
        await broker.enqueue(msg())
        assert sockets_of(dead_pid, directory) == []
    finally:
        await broker.close()


async def test_several_processes_create_the_schema_at_once(url: str, namespace: str, broker: SqliteBroker) -> None:
    await broker.close()  # nothing may exist before the children race
    for suffix in ("", "-wal", "-shm"):
        Path(database_path(parse_url(url)) + suffix).unlink(missing_ok=True)
    start, out = SPAWN.Barrier(6), SPAWN.Queue()
    with contextlib.ExitStack() as stack:
        procs = [stack.enter_context(child(child_create_schema, url, namespace, start, out)) for _ in range(6)]
        results = [await asyncio.to_thread(out.get, True, 60) for _ in procs]
    assert results == ["ok"] * 6
    reopened = await _open_broker(url, namespace)
    try:
        assert sum((await reopened.stats()).queued.values()) == 6
    finally:
        await reopened.close()


def _bind_in(sock: socket.socket, path: Path) -> None:
    """Bind a unix socket at ``path`` even when the path is longer than a socket address
    allows (a deep temporary directory), through the directory's file descriptor."""
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        sock.bind(f"/proc/self/fd/{fd}/{path.name}")
    finally:
        os.close(fd)


async def test_garbage_and_removed_sockets_do_not_break_publishing(url: str, namespace: str, store: SqliteStore) -> None:
    # Given a notify directory holding a stale socket of a dead process, a regular file and a
    # directory that look like sockets, and an unrelated file
    directory = notify_dir(url)
    directory.mkdir(exist_ok=True)
    stale = directory / "999997-0badc0de.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        _bind_in(s, stale)
    (directory / "999998-0badc0de.sock").write_text("not a socket")
    (directory / "999999-0badc0de.sock").mkdir()
    (directory / "README").write_text("unrelated")
    # and a peer whose socket file was removed after it was listed
    gone = directory / "999996-0badc0de.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        _bind_in(s, gone)
        await store.put_states([("warm-up", b"x")])  # lists the directory with `gone` in it
    gone.unlink()

    # When another process waits and this one publishes
    ready, out = SPAWN.Event(), SPAWN.Queue()
    with child(child_watch, url, namespace, "task-1", ready, out) as proc:
        assert await asyncio.to_thread(ready.wait, 30)
        await store.put_states([("task-1", b"done")])
        woke, _, state = await asyncio.to_thread(out.get, True, 30)
        proc.join(10)

    # Then the waiter was woken, dead sockets and fake ones were removed, the rest left alone
    assert (woke, state) == (True, b"done")
    assert not stale.exists() and not (directory / "999998-0badc0de.sock").exists()
    assert (directory / "999999-0badc0de.sock").is_dir() and (directory / "README").exists()


async def test_a_waiter_whose_socket_file_was_removed_binds_a_new_one(url: str, namespace: str, store: SqliteStore) -> None:
    ready, out = SPAWN.Event(), SPAWN.Queue()
    with child(child_watch, url, namespace, "task-1", ready, out) as proc:
        assert await asyncio.to_thread(ready.wait, 30)
        directory = notify_dir(url)
        [first] = sockets_of(proc.pid or 0, directory)
        (directory / first).unlink()
        # The child's reader notices within a few seconds and binds a fresh socket.
        await until(lambda: bool(sockets_of(proc.pid or 0, directory)), "the child's new socket", timeout_s=15)
        await store.put_states([("task-1", b"done")])
        woke, _, state = await asyncio.to_thread(out.get, True, 30)
        proc.join(10)
    assert (woke, state) == (True, b"done")


async def test_a_path_too_long_for_a_socket_address_still_wakes_other_processes(tmp_path: Path, namespace: str) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    url = f"sqlite:///{deep / 'offload.db'}"
    assert len(str(notify_dir(url))) > 110  # beyond sun_path
    store = await _open_store(url, namespace)
    try:
        ready, out = SPAWN.Event(), SPAWN.Queue()
        with child(child_watch, url, namespace, "task-1", ready, out) as proc:
            assert await asyncio.to_thread(ready.wait, 30)
            await store.put_states([("task-1", b"done")])
            woke, _, state = await asyncio.to_thread(out.get, True, 30)
            proc.join(10)
        assert (woke, state) == (True, b"done")
    finally:
        await store.close()


# -- the notifier in this process --------------------------------------------------------------


def test_one_datagram_carries_a_whole_batch_of_topics(tmp_path: Path) -> None:
    db = str(tmp_path / "x.db")
    notifier = notify.open_notifier(db)
    try:
        directory = Path(notifier.directory)
        directory.mkdir()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as peer:
            _bind_in(peer, directory / "424242-00000001.sock")
            peer.settimeout(5)
            topics = [f"t:ns:{i}" for i in range(200)]
            notifier.notify(topics)
            assert sorted(peer.recv(65536).decode().split("\n")) == sorted(topics)
            peer.setblocking(False)
            with pytest.raises(BlockingIOError):
                peer.recv(65536)
            # Too big for one datagram: split, nothing lost.
            many = [f"t:ns:{uuid.uuid4().hex}{'x' * 60}" for i in range(2000)]
            notifier.notify(many)
            peer.settimeout(5)
            received: set[str] = set()
            while len(received) < len(many):
                received.update(peer.recv(65536).decode().split("\n"))
            assert received == set(many)
    finally:
        notifier.release()


def test_a_congested_peer_gets_its_topics_once_it_reads_again(tmp_path: Path) -> None:
    notifier = notify.open_notifier(str(tmp_path / "x.db"))
    try:
        directory = Path(notifier.directory)
        directory.mkdir()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as peer:
            _bind_in(peer, directory / "424242-00000002.sock")
            # Far more datagrams than the kernel queues for one unread socket (qlen ~10):
            # publishing must neither block nor fail; the overflow waits for a retry.
            topics = [f"q:ns:{i}" for i in range(100)]
            for topic in topics:
                notifier.notify([topic])
            peer.settimeout(5)
            received: set[str] = set()
            while len(received) < len(topics):
                received.update(peer.recv(65536).decode().split("\n"))
            assert received == set(topics)
    finally:
        notifier.release()


def test_release_stops_the_reader_and_removes_the_socket(tmp_path: Path) -> None:
    async def main() -> None:
        notifier = notify.open_notifier(str(tmp_path / "x.db"))
        before = set(threading.enumerate())
        with notifier.listen(["a"]):
            pass
        [reader] = [t for t in set(threading.enumerate()) - before if t.name == "offload-notify"]
        assert len(os.listdir(notifier.directory)) == 1
        notifier.release()
        assert os.listdir(notifier.directory) == []
        await asyncio.to_thread(reader.join, 5)
        assert not reader.is_alive()

    asyncio.run(main())


def test_a_forked_child_gets_its_own_socket_and_connection(tmp_path: Path, namespace: str) -> None:
    url = f"sqlite:///{tmp_path / 'offload.db'}"
    parent_broker = make_broker(parse_url(url), namespace)
    assert isinstance(parent_broker, SqliteBroker)
    seen: list[str] = []

    async def parent_side() -> None:
        await parent_broker.connect()
        notifier = parent_broker._h.notifier
        with notifier.listen(["from-child"]) as listener:
            parent_socket = notifier._name
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads running
                pid = os.fork()
            if pid == 0:  # the child: reuse the inherited objects, then leave at once
                code = 1
                try:
                    code = asyncio.run(child_side(parent_socket))
                finally:
                    os._exit(code)
            assert await listener.wait(30), "the child's notification never arrived"
            _, status = await asyncio.to_thread(os.waitpid, pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
        got = await parent_broker.fetch(["default"], 10, timeout_s=5)
        seen.extend(d.body.decode() for d in got)
        await parent_broker.close()

    async def child_side(parent_socket: str | None) -> int:
        notifier = parent_broker._h.notifier
        with notifier.listen(["anything"]):
            own = notifier._name
        if own is None or own == parent_socket or not own.startswith(f"{os.getpid()}-"):
            return 2
        await parent_broker.enqueue(msg(body=b"from the child"))
        notifier.notify(["from-child"])
        return 0

    asyncio.run(parent_side())
    assert seen == ["from the child"]


# -- paths, robustness ---------------------------------------------------------------------------


def test_relative_and_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert database_path(parse_url("sqlite:///offload.db")) == str(tmp_path / "offload.db")
    assert database_path(parse_url("sqlite:///data/x.db?visibility_timeout=5")) == str(tmp_path / "data" / "x.db")
    assert database_path(parse_url("sqlite:////var/lib/app/x.db")) == "/var/lib/app/x.db"
    for bad in ("sqlite://", "sqlite:///:memory:"):
        with pytest.raises(ConfigError):
            database_path(parse_url(bad))


def test_every_statement_of_queries_sql_compiles_against_its_schema(tmp_path: Path) -> None:
    named = [sql for name, sql in vars(queries).items() if name.isupper() and not name.startswith("_") and isinstance(sql, str)]
    built = [sql for n in (1, 3) for sql in (queries.insert_rows(n), queries.put_states_rows(n), queries.due_within(n), *queries.claim(n))]
    assert len(named) > 30
    with contextlib.closing(connect(str(tmp_path / "offload.db"))) as conn:
        for sql in [*named, *built]:
            conn.execute(f"EXPLAIN {sql}", [None] * sql.count("?")).fetchall()  # compiled, not run
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"messages", "dead_letters", "states", "events", "kv"} <= tables


async def test_the_directory_is_created_and_the_file_is_wal(tmp_path: Path, namespace: str) -> None:
    path = tmp_path / "new" / "dir" / "offload.db"
    broker = await _open_broker(f"sqlite:///{path}", namespace)
    try:
        await broker.enqueue(msg())
    finally:
        await broker.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_a_file_that_is_not_a_database_is_reported_unavailable(tmp_path: Path, namespace: str) -> None:
    path = tmp_path / "offload.db"
    path.write_bytes(b"this is not sqlite" * 100)
    broker = make_broker(parse_url(f"sqlite:///{path}"), namespace)
    with pytest.raises(BrokerUnavailable, match=r"offload\.db"):
        await broker.connect()
    await broker.close()


async def test_a_cancelled_fetch_hands_its_claim_back(broker: SqliteBroker) -> None:
    m = msg()
    await broker.enqueue(m)
    # Hold the connection thread so the fetch's claim is queued behind; cancel the fetch, then
    # let the claim run: it commits for a caller that is gone.
    hold, held = threading.Event(), threading.Event()

    def block(conn: sqlite3.Connection) -> None:
        held.set()
        hold.wait(10)

    blocker = asyncio.ensure_future(broker._h.call(block))
    assert await asyncio.to_thread(held.wait, 10)
    fetching = asyncio.ensure_future(broker.fetch(["default"], 1, timeout_s=5))
    jobs = broker._h.database()._jobs  # the connection thread's queue: only the claim goes there
    await until(lambda: jobs.qsize() == 1, "the fetch's claim queued behind the held connection")
    fetching.cancel()
    hold.set()
    await blocker
    with pytest.raises(asyncio.CancelledError):
        await fetching
    [again] = await broker.fetch(["default"], 1, timeout_s=2)
    assert (again.id, again.deliveries) == (m.id, 1)


async def test_a_requeue_from_a_lease_that_ran_out_does_not_disturb_the_new_holder(broker: SqliteBroker) -> None:
    broker.lease_s = 0.2
    await broker.enqueue(msg())
    [first] = await broker.fetch(["default"], 1, timeout_s=2)
    [second] = await broker.fetch(["default"], 1, timeout_s=3)  # the lease ran out
    assert second.deliveries == 2
    broker.lease_s = 30
    await broker.extend([second])
    await broker.requeue(first, b"stale attempt")  # from the worker that lost its lease
    assert await broker.fetch(["default"], 1, timeout_s=0.2) == []
    await broker.ack([second])
    assert (await broker.stats()).running == 0


async def test_channel_subscriber_sees_only_messages_after_it_subscribed(store: SqliteStore) -> None:
    await store.publish("news", b"before")
    async with store.subscribe("news") as sub:
        await store.publish("news", b"after-1")
        await store.publish("other", b"elsewhere")
        await store.publish("news", b"after-2")
        got = [await asyncio.wait_for(sub.__anext__(), 2) for _ in range(2)]
    assert got == [b"after-1", b"after-2"]


async def test_kv_ttl_and_incr(store: SqliteStore) -> None:
    assert await store.incr("n", 2, ttl_s=30) == 2
    assert await store.incr("n", 3) == 5
    assert await store.get_value("n") == b"5"
    assert await store.set_if_absent("lock", b"a", ttl_s=30) is True
    assert await store.set_if_absent("lock", b"b") is False
    await store.put_states([("s", b"x")], ttl_s=0.001)
    await asyncio.sleep(0.01)  # past its time to live: the wait is what is tested
    assert await store.get_states(["s", "missing"]) == [None, None]
    await store.put_states([("kept", b"y")], ttl_s=0)  # 0, as None: kept until deleted
    assert await store.get_states(["kept"]) == [b"y"]


async def test_expired_states_values_and_old_channel_messages_are_pruned(store: SqliteStore, url: str) -> None:
    await store.put_states([("old", b"x")], ttl_s=60)
    await store.put_states([("kept", b"y")], ttl_s=60)
    await store.incr("window", ttl_s=0.01)
    await store.publish("news", b"old news")
    path = database_path(parse_url(url))
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("UPDATE events SET created_at = created_at - 3600")
        conn.execute("UPDATE kv SET expires_at = 1")
        conn.execute("UPDATE states SET expires_at = 1 WHERE task_id = 'old'")
        conn.commit()
    store._next_prune = 0.0
    await store.put_states([("trigger", b"z")])
    await store._h.call(noop)  # jobs run in order: the prune has run
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert sorted(r[0] for r in conn.execute("SELECT task_id FROM states")) == ["kept", "trigger"]
        assert conn.execute("SELECT count(*) FROM kv").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 0


async def test_due_and_ready_rows_compete_by_priority_then_queue_order(broker: SqliteBroker, url: str) -> None:
    # Given scheduled messages whose eta has passed (not yet made ready by a promote) beside
    # ready ones, in two queues
    broker._next_promote = float("inf")
    scheduled = {p: OutgoingMessage(id=f"s{p}", queue="low", body=b"s", priority=p, eta=time.time() + 3600) for p in (1, 5, 3)}
    ready = [OutgoingMessage(id="r4", queue="low", body=b"r", priority=4), OutgoingMessage(id="h3", queue="high", body=b"h", priority=3)]
    for m in [*scheduled.values(), *ready]:
        await broker.enqueue(m)
    with contextlib.closing(sqlite3.connect(database_path(parse_url(url)))) as conn:
        conn.execute("UPDATE messages SET visible_at = 0 WHERE state = 1")
        conn.commit()
    # When one fetch takes them all
    got = await broker.fetch(["high", "low"], 10, timeout_s=2)
    # Then priority first, "high" before "low" at equal priority, arrival last
    assert [d.id for d in got] == ["s5", "r4", "h3", "s3", "s1"]
    stats = await broker.stats()
    assert (stats.running, stats.scheduled, stats.queued) == (5, 0, {})


async def test_stats_count_each_kind_once(broker: SqliteBroker) -> None:
    await broker.enqueue(msg())
    await broker.enqueue(msg())
    await broker.enqueue(OutgoingMessage(id="later", queue="default", body=b"x", eta=time.time() + 3600))
    [d] = await broker.fetch(["default"], 1, timeout_s=2)
    await broker.enqueue(msg("other"))
    [dead] = await broker.fetch(["other"], 1, timeout_s=2)
    await broker.dead_letter(dead, "bad")
    stats = await broker.stats()
    assert (stats.queued, stats.scheduled, stats.running, stats.dead) == ({"default": 1}, 1, 1, 1)
    assert await broker.cancel(d.id) is False  # leased
    assert await broker.cancel("later") is True


async def test_concurrent_calls_share_transactions_and_keep_their_own_answers(broker: SqliteBroker, store: SqliteStore) -> None:
    plain = [msg() for _ in range(250)]
    keyed = [OutgoingMessage(id=f"k{i}", queue="default", body=b"k", key="same") for i in range(10)]
    answers = await asyncio.gather(*(broker.enqueue(m) for m in [*plain, *keyed]))
    assert answers[:250] == [m.id for m in plain]
    assert len(set(answers[250:])) == 1 and answers[250] in {m.id for m in keyed}
    got = await broker.fetch(["default"], 1000, timeout_s=2)
    assert sorted(d.id for d in got) == sorted([*(m.id for m in plain), answers[250]])
    await asyncio.gather(*(broker.ack([d]) for d in got))
    assert await broker.fetch(["default"], 1, timeout_s=0) == []

    await asyncio.gather(
        store.put_states([("a", b"1"), ("b", b"2")]),
        store.put_states([("c", b"3")], ttl_s=0.001),  # its own time to live, in a shared transaction
        store.put_states([("a", b"1-again")]),
    )
    await asyncio.sleep(0.01)  # past c's time to live: the wait is what is tested
    assert await store.get_states(["a", "b", "c"]) == [b"1-again", b"2", None]


async def test_a_file_of_schema_2_gains_the_history_and_keeps_its_states(tmp_path: Path) -> None:
    # The states table as schema 2 made it, with a state in it
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE states (namespace TEXT NOT NULL, task_id TEXT NOT NULL, data BLOB NOT NULL, "
                 "expires_at REAL, PRIMARY KEY (namespace, task_id))")
    conn.execute("INSERT INTO states VALUES ('default', 'old', x'6f6c64', NULL)")
    conn.execute("PRAGMA user_version=2")
    conn.commit()
    conn.close()
    store = make_store(parse_url(f"sqlite:///{path}"), "default")
    await store.connect()
    try:
        assert await store.get_states(["old"]) == [b"old"]
        await store.put_states([StateRow("new", b"new", Listing("queued", "tasks.x", "default", 1.0))])
        assert await store.history(HistoryQuery()) == [("new", b"new")]
    finally:
        await store.close()
    check = sqlite3.connect(path)
    assert check.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    check.close()
