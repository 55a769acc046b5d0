"""Serving a gateway with uvicorn (``offload gateway``), draining it on shutdown."""

from __future__ import annotations

import math
import socket
from collections.abc import Sequence

import uvicorn

from offload.app import Offload
from offload.gateway.gateway import Gateway
from offload.gateway.redact import redact_logs


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, gateway: Gateway) -> None:
        super().__init__(config)
        self._gateway = gateway

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Answer the long polls and end the streams first, so the connections close by
        # themselves and clients reconnect at once, instead of being cut at the deadline.
        self._gateway.drain()
        await super().shutdown(sockets)


def serve(app: Offload, *, host: str = "127.0.0.1", port: int = 8000, cors_origins: Sequence[str] = (),
          grace_s: float = 5.0, access_log: bool = True, log_level: str = "info") -> None:
    """Run the gateway of ``app`` until SIGINT/SIGTERM. ``grace_s``: how long requests still
    running at shutdown get to finish before they are cancelled."""
    asgi = app.asgi(cors_origins=list(cors_origins))
    config = uvicorn.Config(
        asgi, host=host, port=port, log_level=log_level, lifespan="on", access_log=access_log,
        timeout_graceful_shutdown=max(math.ceil(grace_s), 1),
    )
    # After uvicorn.Config, which sets up uvicorn's loggers: the access log shows every query
    # string, and a query string may carry a token.
    redact_logs()
    _DrainingServer(config, asgi.state.gateway).run()
