"""The sync face on Redis: `delay()` and `get()` talk to Redis from the caller's thread through
`Direct`, without offload's loop thread; a final state reaches every blocked waiter, and one
that was replaced (a replayed task) is never handed out."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest
import redis  # only to act on the server from outside, like an operator would

from offload import Offload
from offload.brokers import make_direct, make_store
from offload.brokers.base import Direct, OutgoingMessage
from offload.config import parse_url
from offload.errors import TaskFailed
from tests.conftest import REDIS_URL, require_server
from tests.support import flush_namespace, thread_worker


@pytest.fixture
def redis_url() -> str:
    require_server("redis")
    return REDIS_URL


@pytest.fixture
def direct(redis_url: str, namespace: str) -> Iterator[Direct]:
    made = make_direct(parse_url(redis_url), namespace)
    assert made is not None
    try:
        yield made
    finally:
        made.close()


async def test_a_final_state_reaches_every_blocked_waiter(redis_url: str, namespace: str, direct: Direct) -> None:
    store = make_store(parse_url(redis_url), namespace)
    await store.connect()
    try:
        got: list[bytes | None] = []
        entered = threading.Barrier(3)

        def wait() -> None:
            entered.wait(5)
            got.append(direct.wait_final("t1", 5))

        waiters = [threading.Thread(target=wait) for _ in range(2)]
        for w in waiters:
            w.start()
        entered.wait(5)
        await store.put_states([("t1", b"started")], 60)  # not final: nobody wakes for it
        await store.put_states([("t1", b"done")], 60, final={"t1"})
        for w in waiters:
            w.join(10)
        assert got == [b"done", b"done"]
        # Still there for a waiter that comes later, and a plain read sees the same state.
        assert direct.wait_final("t1", 0.01) == b"done"
        assert direct.get_states(["t1", "missing"]) == [b"done", None]

        # Started over (a replayed task): the old outcome is not handed out again.
        await store.put_states([("t1", b"queued again")], 60)
        assert direct.wait_final("t1", 0.05) is None
    finally:
        await store.flush_namespace()
        await store.close()


def test_sync_delay_and_get_do_not_go_through_the_loop_thread(redis_url: str, namespace: str) -> None:
    from tests.apps import basic

    app = Offload(redis_url, namespace=namespace)
    add = app.task(name="tests.apps.basic.add")(basic.add.fn)
    fail = app.task(name="tests.apps.basic.fail")(basic.fail.fn)
    worker = thread_worker(app, concurrency=2)
    try:
        assert add.delay(1, 2).get(timeout=10) == 3  # connects; the loop thread is used once

        def refuse(*args: object, **kwargs: object) -> None:
            raise AssertionError("the sync face hopped to the loop thread")

        real_run = app._portal.run
        app._portal.run = refuse  # type: ignore[method-assign]
        try:
            results = [add.delay(i, i) for i in range(20)]
            assert [r.get(timeout=10) for r in results] == [2 * i for i in range(20)]
            assert results[0].state().status == "succeeded"
            failing = fail.delay("no")
            with pytest.raises(TaskFailed) as info:
                failing.get(timeout=10)
            assert info.value.message == "no"
            with pytest.raises(LookupError):
                app.result(uuid.uuid4().hex).get(timeout=1)
        finally:
            app._portal.run = real_run  # type: ignore[method-assign]
    finally:
        worker.stop()
        app._portal.run(flush_namespace(app))
        app.close()


def test_a_forgotten_script_and_a_cut_connection_cost_the_caller_nothing(redis_url: str, namespace: str, direct: Direct) -> None:
    admin = redis.Redis.from_url(REDIS_URL)
    app = Offload(redis_url, namespace=namespace)

    def message() -> OutgoingMessage:
        return OutgoingMessage(id=uuid.uuid4().hex, queue="default", body=b"x", state=b"queued", state_ttl_s=60)

    try:
        first = message()
        assert direct.enqueue(first) == first.id  # connected, the script loaded
        admin.script_flush()  # what a restarted server does to them
        second = message()
        assert direct.enqueue(second) == second.id
        mine = [c["id"] for c in admin.client_list() if c.get("name") == f"offload:{namespace}"]
        assert mine
        for client_id in mine:
            admin.execute_command("CLIENT", "KILL", "ID", client_id)
        assert direct.get_states([first.id, second.id]) == [b"queued", b"queued"]
        assert direct.wait_final(first.id, 0.05) is None  # not final: the wait times out
    finally:
        app._portal.run(flush_namespace(app))
        app.close()
        admin.close()
