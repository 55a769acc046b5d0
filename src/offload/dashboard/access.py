"""Who may see the dashboard, and which requests may change something.

With a password, every dashboard request needs HTTP basic auth as ``admin``: a browser asks for
it once and sends it with every request, the page's scripts and streams included. Without one,
only clients on the machine itself (loopback) are served: the pages show task arguments and
tracebacks, which are nobody else's business.

Actions (replay, purge) are POSTs that must carry the page's CSRF token in ``X-CSRF-Token``
with a JSON body. A form on another site can send neither: basic auth alone would not stop it,
since the browser attaches the credentials to any request to the dashboard's origin.
"""

from __future__ import annotations

import base64
import hmac
import secrets

from starlette.exceptions import HTTPException
from starlette.requests import Request

from offload.gateway.serve import is_loopback

USER = "admin"
CSRF_HEADER = "x-csrf-token"


class DashboardAccess:
    def __init__(self, password: str | None) -> None:
        if password is not None and not password:
            raise ValueError("dashboard_password must not be empty (pass None to serve on loopback only)")
        self.password = password
        credentials = base64.b64encode(f"{USER}:{password}".encode()).decode() if password else ""
        self._authorization = f"Basic {credentials}".encode() if password else None
        # One per process: a page loaded before a restart gets a 403 on its next action and
        # reloads, which is the honest outcome after a restart anyway.
        self.csrf_token = secrets.token_urlsafe(32)

    def check(self, request: Request) -> None:
        """Raise 401 (no or wrong credentials) or 403 (no password and a remote client)."""
        if self._authorization is None:
            # No client address: a Unix socket or an in-process client, no network peer at all.
            if request.client is not None and not is_loopback(request.client.host):
                raise HTTPException(403, "the dashboard has no password, so it serves this machine only")
            return
        given = request.headers.get("authorization", "").encode("latin-1", "replace")
        if not hmac.compare_digest(given, self._authorization):
            raise HTTPException(401, "the dashboard needs a user name and password",
                                {"www-authenticate": 'Basic realm="offload dashboard", charset="UTF-8"'})

    def check_action(self, request: Request) -> None:
        """An action must come from the dashboard's own page (see the module's docstring)."""
        token = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(token.encode("latin-1", "replace"), self.csrf_token.encode()):
            raise HTTPException(403, "missing or stale CSRF token: reload the dashboard")
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise HTTPException(415, "actions take a JSON body (Content-Type: application/json)")
        origin = request.headers.get("origin")
        if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
            raise HTTPException(403, f"an action from another origin ({origin}) is refused")
