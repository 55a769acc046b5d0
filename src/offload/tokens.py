"""Signed capabilities for browsers.

A token lets whoever holds it read one task (or follow one channel) through the gateway, in
one namespace, until it expires. It is ``<expiry>.<mac>``: the expiry in epoch seconds and an
HMAC-SHA256, in URL-safe base64, over the kind (task or channel), the namespace, the subject
and the expiry. The MAC key is derived from the app's ``secret`` under a label of its own, so
a token can never pass for a message signature, nor a task token for a channel token.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import time
from typing import TYPE_CHECKING

from offload.errors import ConfigError

if TYPE_CHECKING:
    from offload.app import Offload

__all__ = ["DEFAULT_EXPIRES_S", "check_channel_token", "check_token", "make_channel_token", "make_token"]

#: How long a token is valid when ``expires_in`` is not given: one day.
DEFAULT_EXPIRES_S = 86_400.0

_LABEL = b"offload.gateway-token.v1"
_TASK = "task"
_CHANNEL = "channel"


def make_token(app: Offload, task_id: str, expires_in: float | dt.timedelta | None = None) -> str:
    """A token that lets a browser read task ``task_id`` of ``app``'s namespace."""
    return _make(app, _TASK, task_id, expires_in)


def check_token(app: Offload, task_id: str, token: str | None) -> bool:
    """True when ``token`` was made by `make_token` for this task and namespace and has not expired."""
    return _check(app, _TASK, task_id, token)


def make_channel_token(app: Offload, channel: str, expires_in: float | dt.timedelta | None = None) -> str:
    """A token that lets a browser follow pub/sub ``channel`` of ``app``'s namespace."""
    return _make(app, _CHANNEL, channel, expires_in)


def check_channel_token(app: Offload, channel: str, token: str | None) -> bool:
    return _check(app, _CHANNEL, channel, token)


def _make(app: Offload, kind: str, subject: str, expires_in: float | dt.timedelta | None) -> str:
    if app.secret is None:
        raise ConfigError("tokens are signed with the app's secret: pass secret=... to Offload(...)")
    seconds = DEFAULT_EXPIRES_S if expires_in is None else (
        expires_in.total_seconds() if isinstance(expires_in, dt.timedelta) else float(expires_in)
    )
    if not seconds > 0:
        raise ConfigError(f"expires_in must be a positive number of seconds, got {expires_in!r}")
    expires_at = int(time.time() + seconds)
    return f"{expires_at}.{_b64(_mac(app.secret, kind, app.namespace, subject, expires_at))}"


def _check(app: Offload, kind: str, subject: str, token: str | None) -> bool:
    if app.secret is None or not token:
        return False
    expiry, sep, mac = token.partition(".")
    if not sep or not expiry.isdigit() or len(expiry) > 12:
        return False
    expires_at = int(expiry)
    if expires_at < time.time():
        return False
    expected = _b64(_mac(app.secret, kind, app.namespace, subject, expires_at))
    return hmac.compare_digest(expected, mac)


def _mac(secret: bytes, kind: str, namespace: str, subject: str, expires_at: int) -> bytes:
    key = hmac.new(secret, _LABEL, hashlib.sha256).digest()
    # JSON keeps the fields apart whatever characters a subject holds.
    message = json.dumps([kind, namespace, subject, expires_at], separators=(",", ":")).encode()
    return hmac.new(key, message, hashlib.sha256).digest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
