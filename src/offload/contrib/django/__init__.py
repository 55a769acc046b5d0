"""offload for Django: settings, one app per project, ``tasks.py`` discovery, the gateway as
Django views, enqueueing on commit, and telling users when their tasks end.

Add ``"offload.contrib.django"`` to ``INSTALLED_APPS``, then::

    # myapp/tasks.py (found by autodiscovery, in the web process and in workers)
    from offload.contrib.django import app

    @app.task
    def report(n: int) -> str: ...

    # urls.py: the gateway under any prefix
    path("offload/", include("offload.contrib.django.urls"))

Workers load the same app, with ``DJANGO_SETTINGS_MODULE`` set::

    offload worker offload.contrib.django:app -q default

``app`` is resolved lazily: reading it sets Django up when that has not happened yet (a
worker), and builds the app from the ``OFFLOAD`` setting (see `conf`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from offload.app import Offload
    from offload.contrib.django.owners import adelay_for, delay_for, for_user
    from offload.contrib.django.transactions import delay_on_commit

    app: Offload

__all__ = ["adelay_for", "app", "delay_for", "delay_on_commit", "for_user", "get_app"]

# Names served lazily: importing this package must not import Django's models (it is imported
# while Django populates its apps, and by `offload worker` before Django is set up).
_LAZY = {
    "delay_on_commit": "offload.contrib.django.transactions",
    "delay_for": "offload.contrib.django.owners",
    "adelay_for": "offload.contrib.django.owners",
    "for_user": "offload.contrib.django.owners",
}


def get_app() -> Offload:
    """The project's app (built once per process from the settings)."""
    from offload.contrib.django.conf import project_app

    return project_app()


def __getattr__(name: str) -> Any:
    if name == "app":
        return get_app()
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
