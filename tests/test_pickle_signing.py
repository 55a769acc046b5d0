"""serializer="pickle" needs a secret, and every value it would unpickle is signed and checked
first: a raw pickle written to a real store (a task state, a channel, the control channel) is
never unpickled, by the caller, a subscriber or a real worker."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import pickle
from collections.abc import Iterator
from pathlib import Path

import pytest

from offload import Offload, TaskCancelled
from offload.brokers import make_store
from offload.brokers.base import Store
from offload.channels import CONTROL_CHANNEL
from offload.errors import ConfigError, SignatureError
from offload.message import Codec
from offload.serializers import get_serializer
from tests.conftest import require_server, urls_for
from tests.support import flush_namespace, start_worker, wait_until

SECRET = "pickle-tests-secret"
T = 15


class MakesDirectory:
    """A pickle that runs code when loaded: it creates the directory named ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.makedirs, (self.path,))


def raw_pickle(marker: Path) -> bytes:
    return pickle.dumps(MakesDirectory(marker))


def test_pickle_without_a_secret_is_refused_saying_why() -> None:
    with pytest.raises(ConfigError, match=r"serializer='pickle' needs a secret=\.\.\.: loading it runs code"):
        Offload("memory://", serializer="pickle")
    with pytest.raises(ConfigError, match="needs a secret"):
        Offload("memory://", serializer="pickle", secret="")


def test_pickled_values_round_trip_signed_and_others_are_refused_unread(tmp_path: Path) -> None:
    codec = Codec(get_serializer("pickle"), secret=b"k1")
    value = {"set": {1, 2}, "pair": (1, 2)}
    assert codec.loads(codec.dumps(value)) == value
    marker = tmp_path / "ran"
    evil = raw_pickle(marker)
    # Unsigned, signed with another secret, signed with the envelope's key, cut short.
    other = Codec(get_serializer("pickle"), secret=b"k2").dumps(MakesDirectory(marker))
    envelope_keyed = hmac.new(b"k1", evil, hashlib.sha256).digest() + evil
    for data in (evil, other, envelope_keyed, codec.dumps(value)[:20]):
        with pytest.raises(SignatureError, match="signature is missing or wrong"):
            codec.loads(data)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["json", "msgpack"])
def test_values_of_serializers_that_run_no_code_are_not_signed(name: str) -> None:
    codec = Codec(get_serializer(name), secret=b"k1")
    assert codec.dumps({"a": 1}) == get_serializer(name).dumps({"a": 1})


@pytest.fixture(params=["sqlite", "redis"])
def pickle_app(request: pytest.FixtureRequest, tmp_path: Path, namespace: str) -> Iterator[Offload]:
    require_server(request.param)
    url, _ = urls_for(request.param, tmp_path)
    app = Offload(url, namespace=namespace, serializer="pickle", secret=SECRET)
    yield app
    app._portal.run(flush_namespace(app))
    app.close()


async def attacker_store(app: Offload) -> Store:
    """A store client of its own, writing bytes straight to the server as an intruder would."""
    store = make_store(app.results_url, app.namespace)
    await store.connect()
    return store


def test_a_raw_pickle_stored_as_a_task_state_is_never_unpickled(pickle_app: Offload, tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    async def plant() -> None:
        store = await attacker_store(pickle_app)
        await store.put_states([("planted", raw_pickle(marker))], 60)
        await store.close()

    pickle_app._portal.run(plant())
    with pytest.raises(SignatureError):
        pickle_app.result("planted").state()
    assert not marker.exists()


async def test_a_raw_pickle_published_on_a_channel_is_dropped(pickle_app: Offload, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    store = await attacker_store(pickle_app)
    try:
        async with pickle_app.subscribe("news") as sub:
            await store.publish("news", raw_pickle(marker))
            await pickle_app.apublish("news", {"n": {1, 2}})
            assert await asyncio.wait_for(anext(sub), T) == {"n": {1, 2}}
    finally:
        await store.close()
        await pickle_app.aclose()
    assert not marker.exists()


def test_a_worker_ignores_a_raw_pickle_on_the_control_channel_and_runs_signed_pickle(
    pickle_app: Offload, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    worker = start_worker(pickle_app.url.raw, pickle_app.namespace,
                          extra_env={"OFFLOAD_TEST_SECRET": SECRET, "OFFLOAD_TEST_SERIALIZER": "pickle"})
    try:
        def cancel_a_running_task(name: str) -> None:
            """Returns once the worker has read a cancellation from the control channel."""
            started = tmp_path / name
            r = pickle_app.send("tests.apps.basic.async_touch_then_sleep", str(started), 60)
            wait_until(started.exists, T, f"{name} started")
            r.cancel()
            with pytest.raises(TaskCancelled):
                r.get(timeout=T)

        cancel_a_running_task("first")  # the worker listens on the control channel now

        async def plant() -> None:
            store = await attacker_store(pickle_app)
            await store.publish(CONTROL_CHANNEL, raw_pickle(marker))
            await store.close()

        pickle_app._portal.run(plant())
        cancel_a_running_task("second")  # published after the raw pickle: read after it
        assert not marker.exists()
        assert pickle_app.send("tests.apps.basic.add", 2, 3).get(timeout=T) == 5
        assert worker.proc.poll() is None
    finally:
        worker.stop()
