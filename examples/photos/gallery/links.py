"""Private download links for exports: signed (unguessable without SECRET_KEY), bound to the
user who asked, and expiring after ``PHOTOS_LINK_MAX_AGE`` seconds."""

from __future__ import annotations

import time

from django.conf import settings
from django.core import signing
from django.urls import reverse

_SALT = "photos.export-link"


def make_link(export_id: int, user_id: int) -> tuple[str, float]:
    """The path of the link and when it expires (epoch seconds)."""
    signed = signing.TimestampSigner(salt=_SALT).sign_object({"e": export_id, "u": user_id}, compress=True)
    return reverse("download", args=[signed]), time.time() + settings.PHOTOS_LINK_MAX_AGE


class LinkRefused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def check_link(signed: str, user_id: int | None) -> int:
    """The export a link names, for this user; `LinkRefused` (403 or 404) otherwise."""
    try:
        data = signing.TimestampSigner(salt=_SALT).unsign_object(signed, max_age=settings.PHOTOS_LINK_MAX_AGE)
    except signing.SignatureExpired:
        raise LinkRefused(403, "this download link has expired: export again") from None
    except signing.BadSignature:
        raise LinkRefused(403, "not a valid download link") from None
    if user_id is None or data.get("u") != user_id:
        # Someone else's export: say nothing of whether it exists.
        raise LinkRefused(404, "no such export")
    return int(data["e"])
