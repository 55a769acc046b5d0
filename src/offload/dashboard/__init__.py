"""The dashboard the gateway serves at ``/dashboard/`` (``app.asgi(dashboard=True)``)."""

from offload.dashboard.routes import dashboard_routes

__all__ = ["dashboard_routes"]
