"""The project's app, built once per process from Django's settings.

``settings.OFFLOAD`` is a dict; every key is optional:

=============== =============================================================================
``URL``         broker URL; else ``$OFFLOAD_URL``; else ``offload.db`` in ``BASE_DIR`` (or the
                working directory)
``NAMESPACE``   else ``$OFFLOAD_NAMESPACE``; else ``"default"``
``RESULTS``     result store URL (needed with ``amqp://``); else ``$OFFLOAD_RESULTS``
``SECRET``      signs messages and browser tokens; else ``$OFFLOAD_SECRET``; else derived
                from ``SECRET_KEY`` under a salt of its own. ``None`` turns signing off.
``SERIALIZER``  ``"json"`` (default), ``"msgpack"`` or ``"pickle"`` (needs a secret: values
                are signed and checked before they are unpickled)
``TIMEZONE``    for cron schedules; else ``TIME_ZONE``
``RESULT_TTL``  seconds (or a timedelta) task states are kept
``DEBUG``       tracebacks reach browsers (default ``False``, whatever ``DEBUG`` says)
``GATEWAY``     keyword arguments of ``app.asgi()`` for the gateway views
=============== =============================================================================
"""

from __future__ import annotations

import os
import threading
from typing import Any

from offload.app import Offload
from offload.errors import ConfigError

SPEC = "offload.contrib.django:app"
_KEYS = frozenset(
    {"URL", "NAMESPACE", "RESULTS", "SECRET", "SERIALIZER", "TIMEZONE", "RESULT_TTL", "DEBUG", "GATEWAY", "COMPRESS_OVER"}
)
_SECRET_SALT = "offload.contrib.django.secret"

_lock = threading.RLock()
_app: Offload | None = None


def project_app() -> Offload:
    """The app of this Django project; sets Django up first when nobody has (a worker)."""
    if _app is not None:
        return _app
    _ensure_django()
    return _build_once()


def _build_once() -> Offload:
    global _app
    with _lock:
        if _app is None:
            from offload.contrib.django.owners import on_outcome

            app = Offload(**app_options())
            app.spec = SPEC  # process-pool children load the app by this name
            app.outcome_hooks.append(on_outcome)
            _app = app
        return _app


def _ensure_django() -> None:
    import django
    from django.apps import apps

    if apps.ready or apps.loading:
        return  # set up, or being set up right now (a models module importing tasks)
    from django.conf import settings

    if not settings.configured and not os.environ.get("DJANGO_SETTINGS_MODULE"):
        raise ConfigError(
            "offload.contrib.django:app needs Django's settings: set DJANGO_SETTINGS_MODULE "
            "(e.g. DJANGO_SETTINGS_MODULE=mysite.settings offload worker offload.contrib.django:app)"
        )
    django.setup()


def user_settings() -> dict[str, Any]:
    from django.conf import settings

    conf = getattr(settings, "OFFLOAD", None) or {}
    if not isinstance(conf, dict):
        raise ConfigError(f"settings.OFFLOAD must be a dict, got {type(conf).__name__}")
    unknown = set(conf) - _KEYS
    if unknown:
        raise ConfigError(f"unknown key(s) in settings.OFFLOAD: {', '.join(sorted(unknown))}; known: {', '.join(sorted(_KEYS))}")
    return conf


def app_options() -> dict[str, Any]:
    """Keyword arguments for `Offload` from the settings, then the environment."""
    from django.conf import settings

    conf = user_settings()
    options: dict[str, Any] = {
        # The default database sits in the project's BASE_DIR (else the working directory).
        "url": conf.get("URL") or os.environ.get("OFFLOAD_URL")
        or "sqlite:///" + os.path.join(str(getattr(settings, "BASE_DIR", None) or os.getcwd()), "offload.db"),
        "namespace": conf.get("NAMESPACE") or None,
        "results": conf.get("RESULTS") or os.environ.get("OFFLOAD_RESULTS") or None,
        "secret": conf["SECRET"] if "SECRET" in conf else os.environ.get("OFFLOAD_SECRET") or derived_secret(),
        "timezone": conf.get("TIMEZONE") or getattr(settings, "TIME_ZONE", None) or "UTC",
        "debug": bool(conf.get("DEBUG", False)),
    }
    for key, name in (("SERIALIZER", "serializer"), ("RESULT_TTL", "result_ttl"), ("COMPRESS_OVER", "compress_over")):
        if key in conf:
            options[name] = conf[key]
    if options.get("serializer") == "pickle" and not options["secret"]:
        raise ConfigError(
            "settings.OFFLOAD['SERIALIZER'] = 'pickle' needs a secret: unpickling runs code, so offload "
            "unpickles only what it signed; remove SECRET=None (the default derives one from SECRET_KEY)"
        )
    return options


def derived_secret() -> str:
    """A secret of its own, from ``SECRET_KEY``: knowing a token never helps to forge Django's
    signatures, nor the other way round."""
    from django.utils.crypto import salted_hmac

    return salted_hmac(_SECRET_SALT, "offload", algorithm="sha256").hexdigest()


def gateway_options() -> dict[str, Any]:
    options = user_settings().get("GATEWAY") or {}
    if not isinstance(options, dict):
        raise ConfigError("settings.OFFLOAD['GATEWAY'] must be a dict of app.asgi() options")
    return dict(options)


def reset() -> None:
    """Forget the app (tests that change the settings)."""
    global _app
    with _lock:
        _app = None
