"""Broker URLs: parsing, validation, and masking of passwords for logs and errors."""

from __future__ import annotations

import os
import re
import urllib.parse
from dataclasses import dataclass, field

from offload.errors import ConfigError

# Characters allowed unencoded in the userinfo part of a URL (RFC 3986: unreserved + sub-delims).
_USERINFO_OK = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=%]")
_PERCENT_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


@dataclass(frozen=True, slots=True)
class BrokerURL:
    """A parsed broker or result-store URL."""

    raw: str
    scheme: str
    host: str | None = None
    port: int | None = None
    username: str | None = None
    password: str | None = None
    path: str = ""
    params: dict[str, str] = field(default_factory=dict)

    @property
    def masked(self) -> str:
        """The URL with its password replaced by ***, safe for logs and error messages."""
        return mask_url(self.raw)

    def param_float(self, name: str, default: float) -> float:
        value = self.params.get(name)
        if value is None:
            return default
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{self.masked}: parameter {name}={value!r} is not a number") from None


def mask_url(url: str) -> str:
    """Hide the password of a URL (also of one that does not parse cleanly)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    userinfo, at, hostpart = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{hostpart}"


def _check_userinfo(scheme: str, userinfo: str, hostpart: str) -> None:
    # A password holding "@", "/", ":" or "#" breaks URL parsing silently (the host becomes
    # part of the password, or the other way round), so check the userinfo by hand and say
    # which characters need escaping, without ever echoing the password itself.
    user, _, password = userinfo.partition(":")
    for label, part in (("user name", user), ("password", password)):
        bad = sorted({c for c in part if not _USERINFO_OK.match(c)})
        if _PERCENT_ESCAPE.search(part):
            bad.append("%")
        if bad:
            escapes = ", ".join(f"{c!r} -> {urllib.parse.quote(c, safe='')}" for c in bad)
            shown_user = "<user>" if label == "user name" else user
            raise ConfigError(
                f"the {label} in the {scheme}:// URL has characters that must be %-encoded "
                f"({escapes}); write {scheme}://{shown_user}:<urllib.parse.quote(password, safe=\"\")>@{hostpart}"
            )


def absolute_sqlite(url: BrokerURL, base_dir: str) -> BrokerURL:
    """A ``sqlite://`` URL whose relative path is resolved against ``base_dir``, so that every
    log line and every process names the same file; other URLs are returned as they are."""
    if url.scheme != "sqlite":
        return url
    raw_path = url.path[1:] if url.path.startswith("/") else url.path
    if not raw_path or raw_path == ":memory:" or raw_path.startswith("file:") or os.path.isabs(raw_path):
        return url  # absolute already, or refused with its reason when the broker is made
    _, _, query = url.raw.partition("?")
    resolved = "sqlite:///" + os.path.normpath(os.path.join(base_dir, raw_path)) + ("?" + query if query else "")
    return parse_url(resolved)


def parse_url(url: str) -> BrokerURL:
    """Parse and validate a URL such as ``redis://:pw@host:6379/0`` or ``sqlite:///x.db``."""
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(f"not a broker URL: {url!r} (expected e.g. sqlite:///offload.db or redis://localhost:6379/0)")
    scheme, _, rest = url.partition("://")
    scheme = scheme.lower()
    if scheme in ("sqlite", "memory"):
        path, _, query = rest.partition("?")
        params = dict(urllib.parse.parse_qsl(query))
        return BrokerURL(raw=url, scheme=scheme, path=path, params=params)
    # Everything before the last "@" is userinfo, even when it holds a "/" that would end the
    # authority early for urlsplit.
    if "@" in rest:
        userinfo, _, hostpart = rest.rpartition("@")
        _check_userinfo(scheme, userinfo, hostpart)
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ConfigError(f"cannot parse {mask_url(url)}: {e}") from None
    return BrokerURL(
        raw=url,
        scheme=scheme,
        host=parts.hostname,
        port=port,
        username=urllib.parse.unquote(parts.username) if parts.username else None,
        password=urllib.parse.unquote(parts.password) if parts.password else None,
        path=parts.path,
        params=dict(urllib.parse.parse_qsl(parts.query)),
    )
