"""Photos and their thumbnails, newsletter statistics, and CSV exports of them."""

from __future__ import annotations

import secrets
from pathlib import PurePath
from typing import Any

from django.conf import settings
from django.db import models
from django.utils import timezone


def _original_path(instance: Any, filename: str) -> str:
    # A random name: two uploads of IMG_0001.JPG never collide, and names reveal nothing.
    return f"originals/{secrets.token_hex(12)}{PurePath(filename).suffix.lower()[:10]}"


class Photo(models.Model):
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="photos")
    name = models.CharField(max_length=255, help_text="the file name as uploaded")
    original = models.FileField(upload_to=_original_path)
    thumbnail = models.CharField(max_length=255, blank=True, help_text="path under MEDIA_ROOT")
    error = models.CharField(max_length=500, blank=True)
    task_id = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-created_at", "-pk"]


class NewsletterStat(models.Model):
    """One mailing of one newsletter: what the export writes out (500,000 rows in the demo)."""

    newsletter = models.CharField(max_length=80)
    sent_on = models.DateField()
    recipients = models.PositiveIntegerField()
    opened = models.PositiveIntegerField()
    clicked = models.PositiveIntegerField()
    unsubscribed = models.PositiveIntegerField()
    bounced = models.PositiveIntegerField()


class Export(models.Model):
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="exports")
    task_id = models.CharField(max_length=64, blank=True)
    path = models.CharField(max_length=255, blank=True, help_text="path under MEDIA_ROOT, once written")
    rows = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-pk"]
