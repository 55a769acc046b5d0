"""Serving a gateway with uvicorn (``offload gateway``), draining it on shutdown."""

from __future__ import annotations

import ipaddress
import logging
import math
import socket
from collections.abc import Sequence

import uvicorn

from offload.app import Offload
from offload.errors import ConfigError
from offload.gateway.gateway import Gateway
from offload.gateway.redact import redact_logs

log = logging.getLogger("offload.gateway")


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, gateway: Gateway) -> None:
        super().__init__(config)
        self._gateway = gateway

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Answer the long polls and end the streams first, so the connections close by
        # themselves and clients reconnect at once, instead of being cut at the deadline.
        self._gateway.drain()
        await super().shutdown(sockets)


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def metrics_served(host: str, metrics: bool | None, metrics_token: str | None) -> bool:
    """Whether to serve ``/metrics``: ``metrics`` when said; by default, on a loopback address,
    or anywhere with a token (it names the queues, which is nobody else's business)."""
    if metrics is not None:
        return metrics
    return metrics_token is not None or is_loopback(host)


def serve(app: Offload, *, host: str = "127.0.0.1", port: int = 8000, cors_origins: Sequence[str] = (),
          grace_s: float = 5.0, access_log: bool = True, log_level: str = "info", metrics: bool | None = None,
          metrics_token: str | None = None, dashboard: bool = False, dashboard_password: str | None = None) -> None:
    """Run the gateway of ``app`` until SIGINT/SIGTERM. ``grace_s``: how long requests still
    running at shutdown get to finish before they are cancelled. ``metrics``: serve ``/metrics``
    (default: see `metrics_served`); ``metrics_token``: the bearer token it then requires.
    ``dashboard``: serve ``/dashboard/``; on an address other than loopback only with a password."""
    if dashboard and not dashboard_password and not is_loopback(host):
        raise ConfigError(f"the dashboard shows task arguments and tracebacks: on {host}, which is not a loopback "
                          "address, it needs a password ($OFFLOAD_DASHBOARD_PASSWORD)")
    served = metrics_served(host, metrics, metrics_token)
    asgi = app.asgi(cors_origins=list(cors_origins), metrics=served, metrics_token=metrics_token,
                    dashboard=dashboard, dashboard_password=dashboard_password or None)
    if not served and metrics is None:
        log.warning("/metrics is off on %s, which is not a loopback address: set a metrics token "
                    "($OFFLOAD_METRICS_TOKEN) or pass --metrics to serve it", host)
    config = uvicorn.Config(
        asgi, host=host, port=port, log_level=log_level, lifespan="on", access_log=access_log,
        timeout_graceful_shutdown=max(math.ceil(grace_s), 1),
    )
    # After uvicorn.Config, which sets up uvicorn's loggers: the access log shows every query
    # string, and a query string may carry a token.
    redact_logs()
    _DrainingServer(config, asgi.state.gateway).run()
