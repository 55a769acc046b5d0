"""offload's own channels (``__offload.*``, where workers hear cancellations) are out of reach:
browsers get a 404 for them, user code a ConfigError; offload itself still uses them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from offload import ConfigError, Offload, Status, TaskCancelled
from offload.channels import CONTROL_CHANNEL
from offload.tokens import make_channel_token
from tests.conftest import urls_for
from tests.gateway.conftest import SECRET, client_for
from tests.support import flush_namespace, start_worker

RESERVED = [CONTROL_CHANNEL, "__offload.anything"]


@pytest.mark.parametrize("name", RESERVED)
@pytest.mark.parametrize("secret", [None, SECRET])
async def test_the_gateway_never_serves_a_reserved_channel(name: str, secret: str | None) -> None:
    app = Offload("memory://reserved", secret=secret)
    # Even when every channel is public.
    async with client_for(app.asgi(public_channels=["*"])) as client:
        for path, params in [(f"/channels/{name}/events", {}), (f"/channels/{name}", {"wait": "0"})]:
            async with asyncio.timeout(10):  # a stream that was let through would never end
                response = await client.get(path, params=params)
            assert response.status_code == 404, (path, response.text)
            assert "reserved" in response.json()["detail"]
        # Other channels are unaffected.
        assert (await client.get("/channels/__offloadish", params={"wait": "0"})).status_code == 200
    await app.aclose()


@pytest.mark.parametrize("name", RESERVED)
async def test_user_code_may_not_publish_or_subscribe_to_a_reserved_channel(name: str) -> None:
    app = Offload("memory://reserved")
    with pytest.raises(ConfigError, match="reserved"):
        await app.apublish(name, {"cancel": "abc"})
    with pytest.raises(ConfigError, match="reserved"):
        await asyncio.to_thread(app.publish, name, {"cancel": "abc"})
    with pytest.raises(ConfigError, match="reserved"):
        async with app.subscribe(name):
            pass
    with pytest.raises(ConfigError, match="reserved"):
        make_channel_token(Offload("memory://reserved", secret=SECRET), name)
    await app.aclose()


async def test_cancelling_a_running_task_still_reaches_its_worker(tmp_path: Path, namespace: str) -> None:
    url, results = urls_for("sqlite", tmp_path)
    app = Offload(url, namespace=namespace, results=results)
    worker = await asyncio.to_thread(start_worker, url, namespace, "--pool", "async", results=results)
    try:
        marker = tmp_path / "started"
        r = await app.ref("tests.apps.basic.async_touch_then_sleep").adelay(str(marker), 60)
        async with asyncio.timeout(20), (await app._store()).watch([r.id]) as watch:
            while (await r.astate()).status is not Status.STARTED:
                await watch.wait(1)  # woken by the store when the state changes
        await r.acancel()  # the worker learns it on the control channel
        with pytest.raises(TaskCancelled):
            await r.wait(timeout=20)
    finally:
        await asyncio.to_thread(worker.stop)
        await flush_namespace(app)
        await app.aclose()
