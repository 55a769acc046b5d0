from __future__ import annotations

from django.apps import AppConfig


class GalleryConfig(AppConfig):
    name = "examples.photos.gallery"
    label = "gallery"
    default_auto_field = "django.db.models.BigAutoField"
