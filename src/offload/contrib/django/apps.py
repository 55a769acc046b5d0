"""The Django app: builds the project's offload app and imports every ``tasks.py``."""

from __future__ import annotations

from django.apps import AppConfig
from django.utils.module_loading import autodiscover_modules


class OffloadConfig(AppConfig):
    name = "offload.contrib.django"
    label = "offload"
    verbose_name = "offload"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from offload.contrib.django.conf import project_app

        project_app()
        # Web processes and workers register the same tasks: both come through here.
        autodiscover_modules("tasks")
