"""Signed capabilities for browsers.

A token lets whoever holds it read one task (or follow one channel) through the gateway, in
one namespace, until it expires. It is ``<expiry>.<mac>``: the expiry in epoch seconds and an
HMAC-SHA256, in URL-safe base64, over the kind (task or channel), the namespace, the subject
and the expiry. The MAC key is derived from the app's ``secret`` under a label of its own, so
a token can never pass for a message signature, nor a task token for a channel token.

A token has exactly one spelling, the one `make_token` writes: ASCII digits without a leading
zero, a dot, and the 43 characters of the unpadded MAC. Anything else (other scripts' digits,
which ``int()`` reads, padding, whitespace, any non-ASCII byte) is refused before the MAC is
computed, and checking never raises, whatever a client sends.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import re
import time
from typing import TYPE_CHECKING

from offload.channels import check_channel_name
from offload.errors import ConfigError

if TYPE_CHECKING:
    from offload.app import Offload

__all__ = ["DEFAULT_EXPIRES_S", "check_channel_token", "check_token", "make_channel_token", "make_token"]

#: How long a token is valid when ``expires_in`` is not given: one day.
DEFAULT_EXPIRES_S = 86_400.0

_LABEL = b"offload.gateway-token.v1"
_TASK = "task"
_CHANNEL = "channel"
#: The canonical token: an expiry (epoch seconds, at most 12 digits) and an unpadded
#: URL-safe base64 SHA-256 MAC. Explicit character classes, not \d or \w, which match
#: digits and letters of every script.
_TOKEN = re.compile(r"([1-9][0-9]{0,11})\.([A-Za-z0-9_-]{43})")


def make_token(app: Offload, task_id: str, expires_in: float | dt.timedelta | None = None) -> str:
    """A token that lets a browser read task ``task_id`` of ``app``'s namespace."""
    return _make(app, _TASK, task_id, expires_in)


def check_token(app: Offload, task_id: str, token: str | None) -> bool:
    """True when ``token`` was made by `make_token` for this task and namespace and has not expired."""
    return _check(app, _TASK, task_id, token)


def make_channel_token(app: Offload, channel: str, expires_in: float | dt.timedelta | None = None) -> str:
    """A token that lets a browser follow pub/sub ``channel`` of ``app``'s namespace."""
    return _make(app, _CHANNEL, check_channel_name(channel), expires_in)


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
    if app.secret is None or not isinstance(token, str):
        return False
    parsed = _TOKEN.fullmatch(token)
    if parsed is None:
        return False
    expires_at = int(parsed.group(1))
    if expires_at < time.time():
        return False
    expected = _b64(_mac(app.secret, kind, app.namespace, subject, expires_at))
    return hmac.compare_digest(expected.encode("ascii"), parsed.group(2).encode("ascii"))


def _mac(secret: bytes, kind: str, namespace: str, subject: str, expires_at: int) -> bytes:
    key = hmac.new(secret, _LABEL, hashlib.sha256).digest()
    # JSON keeps the fields apart whatever characters a subject holds.
    message = json.dumps([kind, namespace, subject, expires_at], separators=(",", ":")).encode()
    return hmac.new(key, message, hashlib.sha256).digest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
