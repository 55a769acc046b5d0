"""FastAPI and Tornado await results while they keep serving other requests: real servers,
a real worker, real HTTP."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.support import ROOT, env_for, free_port, start_worker


def wait_listening(port: int, proc: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)  # nothing to wait on but the port itself
    raise AssertionError(f"nothing listening on {port}")


SERVERS = {
    "fastapi": lambda port: [sys.executable, "-m", "uvicorn", "examples.asyncweb.fastapi_app:api", "--port", str(port), "--log-level", "warning"],
    "tornado": lambda port: [sys.executable, "-m", "examples.asyncweb.tornado_app", "--port", str(port)],
}


@pytest.mark.parametrize("server", sorted(SERVERS))
async def test_awaiting_a_result_does_not_block_the_server(server: str, tmp_path: Path) -> None:
    url, ns = f"sqlite:///{tmp_path / 'web.db'}", f"web{uuid.uuid4().hex[:8]}"
    worker = start_worker(url, ns, "-c", "4", app="examples.asyncweb.tasks:app")
    port = free_port()
    proc = subprocess.Popen(SERVERS[server](port), cwd=ROOT, env=env_for(url, ns), text=True)
    try:
        wait_listening(port, proc)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            # Given three reports that each take a second on the worker
            reports = [asyncio.create_task(client.get(f"/report/{i}", params={"seconds": 1.0})) for i in (1, 2, 3)]
            # When other requests arrive while they wait
            started = time.monotonic()
            pings = []
            while not all(r.done() for r in reports):
                t0 = time.monotonic()
                response = await client.get("/ping")
                pings.append(time.monotonic() - t0)
                assert response.json() == {"pong": "yes"}
                await asyncio.sleep(0.02)
            # Then the server answered them at once, and the reports came back right
            answers = [r.result().json() for r in reports]
            assert answers == [{"customer": i, "orders": 3 * i} for i in (1, 2, 3)]
            assert len(pings) >= 10, "the server did not answer while the reports were pending"
            assert max(pings) < 0.5
            assert time.monotonic() - started < 10
    finally:
        proc.terminate()
        proc.wait(10)
        worker.stop()
