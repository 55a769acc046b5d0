"""The sync face on RabbitMQ: `delay()` publishes from the caller's own thread (py-amqp, with
confirms) and stores the QUEUED state through the result store's sync face. Whatever it cannot
do it leaves to the event loop's broker, and every such hand-over is provoked here for real: a
connection RabbitMQ closes, a queue deleted behind the caller's back, a connection RabbitMQ
refuses, a message it refuses, more callers than connections, a fork."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from offload import Offload
from offload.brokers.amqp.direct import AmqpDirect
from offload.errors import BrokerError, BrokerUnavailable
from tests.conftest import AMQP_URL, REDIS_URL, require_server
from tests.support import flush_namespace, thread_worker, wait_until

from .test_amqp import rabbitmqctl


@pytest.fixture
def servers() -> None:
    require_server("amqp")
    require_server("redis")


def _app(namespace: str, url: str = AMQP_URL) -> tuple[Offload, Any, Any]:
    from tests.apps import basic

    app = Offload(url, namespace=namespace, results=REDIS_URL)
    add = app.task(name="tests.apps.basic.add")(basic.add.fn)
    noop = app.task(name="tests.apps.basic.noop")(basic.noop.fn)
    app.task(name="tests.apps.basic.record")(basic.record.fn)
    return app, add, noop


MakeApp = Callable[..., tuple[Offload, Any, Any]]


@pytest.fixture
def make_app(servers: None, namespace: str) -> Iterator[MakeApp]:
    """Apps on this test's namespace (amqp, Redis results), flushed and closed afterwards."""
    apps: list[Offload] = []

    def make(url: str = AMQP_URL) -> tuple[Offload, Any, Any]:
        made = _app(namespace, url)
        apps.append(made[0])
        return made

    try:
        yield make
    finally:
        for app in apps:
            app._portal.run(flush_namespace(app))
            app.close()


def _sender(app: Offload) -> AmqpDirect:
    sender = app._direct_sender_client
    assert isinstance(sender, AmqpDirect)
    return sender


def _ctl(*args: str) -> str:
    return asyncio.run(rabbitmqctl(*args))


def _sync_connections(namespace: str) -> list[str]:
    listing = _ctl("list_connections", "pid", "client_properties", "-q")
    return [line.split("\t", 1)[0] for line in listing.splitlines() if f"offload {namespace} " in line and "sync producer" in line]


class _NoHop:
    """While active, the sync face may not use offload's loop thread."""

    def __init__(self, app: Offload) -> None:
        self.app, self.real = app, app._portal.run

    def __enter__(self) -> None:
        def refuse(*args: object, **kwargs: object) -> None:
            for arg in args:
                getattr(arg, "close", lambda: None)()  # the coroutine that was not run
            raise AssertionError("the sync face hopped to the loop thread")

        self.app._portal.run = refuse  # type: ignore[method-assign]

    def __exit__(self, *exc: object) -> None:
        self.app._portal.run = self.real  # type: ignore[method-assign]


def test_sync_delay_publishes_and_stores_queued_from_the_callers_thread(make_app: MakeApp, namespace: str) -> None:
    app, add, _ = make_app()
    add.delay(0, 0)  # the loop declares the queue and connects; the sender is made
    with _NoHop(app):
        results = [add.delay(i, i) for i in range(20)]
        assert {r.status() for r in results} == {"queued"}  # no worker yet: QUEUED was stored
    assert _sender(app)._open == 1
    worker = thread_worker(app, concurrency=2)
    try:
        with _NoHop(app):
            assert [r.get(timeout=20) for r in results] == [2 * i for i in range(20)]
    finally:
        worker.stop()


def test_a_connection_rabbitmq_closes_costs_the_caller_nothing(make_app: MakeApp, namespace: str) -> None:
    app, add, _ = make_app()
    worker = thread_worker(app, concurrency=2)
    try:
        assert add.delay(1, 1).get(timeout=20) == 2
        assert add.delay(2, 2).get(timeout=20) == 4  # sent from this thread
        closed = _sync_connections(namespace)
        assert len(closed) == 1
        _ctl("close_connection", closed[0], "offload test: forced close")
        # The dead connection fails this send, the loop sends it instead; the next one opens a
        # new connection. Each task runs once.
        results = [add.delay(i, 10) for i in range(5)]
        assert [r.get(timeout=20) for r in results] == [10 + i for i in range(5)]
        now = _sync_connections(namespace)
        assert len(now) == 1 and now != closed
        assert _sender(app)._open == 1
    finally:
        worker.stop()


def test_a_queue_deleted_behind_the_callers_back_is_declared_again(make_app: MakeApp, namespace: str) -> None:
    app, add, _ = make_app()
    add.delay(0, 0)
    _ctl("delete_queue", f"offload.{namespace}.default")
    # RabbitMQ returns the message (mandatory); the loop declares the queue again and sends it.
    result = add.delay(3, 4)
    worker = thread_worker(app, concurrency=1)
    try:
        assert result.get(timeout=20) == 7
        with _NoHop(app):
            assert add.delay(5, 5).get(timeout=20) == 10
    finally:
        worker.stop()


def test_a_message_rabbitmq_refuses_is_an_error(make_app: MakeApp, namespace: str) -> None:
    app, _, noop = make_app()
    policy = f"offload-test-{namespace}"
    _ctl("set_policy", policy, f"^offload\\.{namespace}\\.default$", '{"max-length":1,"overflow":"reject-publish"}', "--apply-to", "queues")
    try:
        noop.delay()  # declared under the policy; the queue is full now
        with _NoHop(app), pytest.raises(BrokerError, match="refused a message"):
            noop.delay()
        assert _sender(app)._open == 0  # the connection that was refused on is not reused
    finally:
        _ctl("clear_policy", policy)


def test_a_connection_rabbitmq_refuses_leaves_the_send_to_the_loop(make_app: MakeApp, namespace: str) -> None:
    vhost = f"offload-test-{namespace}"
    _ctl("add_vhost", vhost)
    try:
        _ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        # Room for the loop's connection only.
        _ctl("set_vhost_limits", "-p", vhost, '{"max-connections": 1}')
        # Not from make_app: this app and its namespace go before the vhost does.
        app, _, noop = _app(namespace, f"{AMQP_URL.rstrip('/')}/{vhost}")
        try:
            sent = [noop.delay().id for _ in range(3)]
            assert len(set(sent)) == 3
            assert _sender(app)._open == 0
            listing = _ctl("list_queues", "-p", vhost, "name", "messages", "-q")
            assert f"offload.{namespace}.default\t3" in listing
        finally:
            app._portal.run(flush_namespace(app))
            app.close()
    finally:
        _ctl("delete_vhost", vhost)


def test_sync_connections_0_sends_through_the_loop(make_app: MakeApp, namespace: str) -> None:
    app, add, _ = make_app(f"{AMQP_URL}?sync_connections=0")
    worker = thread_worker(app, concurrency=2)
    try:
        assert [add.delay(i, 1).get(timeout=20) for i in range(3)] == [1, 2, 3]
        assert _sender(app)._open == 0
        assert _sync_connections(namespace) == []
    finally:
        worker.stop()


def test_more_callers_than_connections(make_app: MakeApp, namespace: str) -> None:
    app, add, _ = make_app(f"{AMQP_URL}?sync_connections=2")
    add.delay(0, 0)
    results: list[Any] = []
    lock = threading.Lock()
    start = threading.Barrier(6)

    def send(base: int) -> None:
        start.wait(10)
        for i in range(30):
            r = add.delay(base, i)
            with lock:
                results.append((base + i, r))

    threads = [threading.Thread(target=send, args=(1000 * k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 180 and _sender(app)._open <= 2
    worker = thread_worker(app, concurrency=4)
    try:
        assert all(r.get(timeout=30) == expected for expected, r in results)
    finally:
        worker.stop()
    listing = _ctl("list_queues", "name", "messages", "-q")
    assert f"offload.{namespace}.default\t0" in listing  # every copy ran: none was sent twice


def _send_in_child(add: Any, out: Any) -> None:
    # The parent's app, as a forked web server's worker process has it: the first send goes
    # through the child's own loop (which declares the queue), the second from this thread.
    add.delay(0, 0)
    result = add.delay(20, 22)
    sender = add.app._direct_sender_client
    out.put([result.id, sender._open if isinstance(sender, AmqpDirect) else 0])
    add.app.close()


def test_a_forked_child_opens_its_own_connection(make_app: MakeApp, namespace: str) -> None:
    app, add, _ = make_app()
    add.delay(0, 0)
    add.delay(0, 1)  # the parent's connection is open
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_send_in_child, args=(add, out))
    child.start()
    sent_by_child, open_in_child = out.get(timeout=30)
    child.join(30)
    assert child.exitcode == 0 and open_in_child == 1
    with _NoHop(app):
        mine = add.delay(1, 1)  # the parent's connection still works
    worker = thread_worker(app, concurrency=2)
    try:
        assert app.result(sent_by_child).get(timeout=20) == 42
        assert mine.get(timeout=20) == 2
    finally:
        worker.stop()


def test_the_sync_connection_is_named_after_the_app(make_app: MakeApp, namespace: str) -> None:
    _, add, _ = make_app()
    add.delay(0, 0)
    add.delay(0, 0)
    assert len(_sync_connections(namespace)) == 1


def test_a_queued_state_that_cannot_be_stored_is_reported_after_the_send(
    make_app: MakeApp, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from offload.brokers.redis import direct as redis_direct

    # The caller's Redis client gives up after 50 ms; Redis then holds writes for 400.
    monkeypatch.setattr(redis_direct, "OPERATION_TIMEOUT_S", 0.05)
    app, _, _ = make_app()
    record = app.tasks["tests.apps.basic.record"]
    ran = tmp_path / "ran"
    record.delay(str(ran), "first")  # through the loop: the queue is declared, the faces made
    operator = redis.Redis.from_url(REDIS_URL)
    try:
        operator.execute_command("CLIENT", "PAUSE", 400, "WRITE")
        with _NoHop(app), pytest.raises(BrokerUnavailable) as info:
            record.delay(str(ran), "second")
        assert "was sent all the same" in " ".join(getattr(info.value, "__notes__", []))
    finally:
        operator.close()
    monkeypatch.undo()
    # The message was sent: a worker (of an app with the usual timeouts) runs both.
    other, _, _ = make_app()
    worker = thread_worker(other, concurrency=1)
    try:
        wait_until(lambda: sorted(ran.read_text().split()) == ["first", "second"] if ran.exists() else False, timeout=20)
    finally:
        worker.stop()
