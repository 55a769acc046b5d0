"""The browser gateway: task states by long polling and Server-Sent Events, pub/sub channels,
the ``offload.js`` client, health and Prometheus metrics, as one ASGI application.

``app.asgi(**options)`` builds it (see `create_gateway` for the options); ``offload gateway
APP`` serves it with uvicorn; any ASGI server or framework can mount it under a prefix.
"""

from offload.gateway.app import create_gateway

__all__ = ["create_gateway"]
