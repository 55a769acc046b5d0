"""The site's background work: thumbnails (CPU: a process-pool worker on ``images``), CSV
exports (I/O: a thread worker on ``exports``) and the nightly cleanup (``default``)."""

from __future__ import annotations

import csv
import datetime as dt
import logging
import os
import resource
import secrets
import time
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.mail import send_mail
from django.urls import reverse
from django.utils import timezone

from examples.photos.gallery import images
from examples.photos.gallery.links import make_link
from examples.photos.gallery.models import Export, NewsletterStat, Photo
from offload import cron, current
from offload.contrib.django import app, owners

log = logging.getLogger("examples.photos")

EXPORT_FIELDS = ("id", "newsletter", "sent_on", "recipients", "opened", "clicked", "unsubscribed", "bounced")
#: Rows fetched per round trip: the worker holds this many at a time, whatever the table's size.
CHUNK = 5_000


def exports_channel(user_id: int) -> str:
    """The pub/sub channel where a user's page hears of finished exports."""
    return f"exports.{user_id}"


@app.task(queue="images", time_limit=120)
def make_thumbnail(photo_id: int) -> dict[str, Any]:
    photo = Photo.objects.get(pk=photo_id)
    source = Path(photo.original.path)

    def progress(fraction: float, message: str) -> None:
        current.progress(fraction, message, force=True)

    try:
        target, width, height = images.make_thumbnail(
            source, Path(settings.MEDIA_ROOT) / "thumbs" / secrets.token_hex(12), progress
        )
    except images.NotAnImage as e:
        # Saved for the page's next render; raised for the browser waiting on it now (no
        # retries: another attempt would not make the file readable).
        Photo.objects.filter(pk=photo_id).update(error=str(e))
        raise
    Photo.objects.filter(pk=photo_id).update(thumbnail=str(target.relative_to(settings.MEDIA_ROOT)), error="")
    return {"url": reverse("thumbnail", args=[photo_id]), "width": width, "height": height}


@app.task(queue="exports", time_limit=900)
def export_stats(export_id: int) -> dict[str, Any]:
    export = Export.objects.select_related("owner").get(pk=export_id)
    started = time.perf_counter()
    rows = NewsletterStat.objects.order_by("pk").values_list(*EXPORT_FIELDS)
    total = rows.count()
    relative = Path("exports") / f"newsletter-statistics-{secrets.token_hex(12)}.csv"
    target = Path(settings.MEDIA_ROOT) / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".part")
    written = 0
    current.progress(0.0, f"0 of {total:,} rows", force=True)
    with partial.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(EXPORT_FIELDS)
        # iterator(): rows stream from the database CHUNK at a time (a server-side cursor on
        # PostgreSQL, fetchmany on SQLite), so memory stays flat for any number of rows.
        for row in rows.iterator(chunk_size=CHUNK):
            writer.writerow(row)
            written += 1
            if written % CHUNK == 0:
                current.progress(written / max(total, 1), f"{written:,} of {total:,} rows")
    os.replace(partial, target)  # never a half-written file behind a link
    export.path, export.rows, export.finished_at = str(relative), written, timezone.now()
    export.save(update_fields=["path", "rows", "finished_at"])

    path, expires_at = make_link(export.pk, export.owner_id)
    url = settings.PHOTOS_SITE_URL.rstrip("/") + path
    current.publish(exports_channel(export.owner_id), {"export": export.pk, "url": path, "rows": written,
                                                        "expires_at": expires_at})
    if export.owner.email:
        send_mail(
            "Your newsletter statistics export is ready",
            f"{written:,} rows are ready to download until {_when(expires_at)}:\n\n{url}\n\n"
            "The link works only while you are signed in as the user who asked for it.",
            None, [export.owner.email],
        )
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    log.info("exported %d rows in %.1f s (worker peak RSS %.0f MB)", written, time.perf_counter() - started, peak_mb)
    return {"url": path, "rows": written, "expires_at": expires_at,
            "message": f"your export of {written:,} rows is ready: {url}"}


@app.periodic(cron("0 3 * * *"))
def nightly_cleanup(older_than_days: float | None = None) -> dict[str, int]:
    """Delete thumbnails, originals and exports older than PHOTOS_RETENTION_DAYS (or the days
    given, when run by hand: ``offload send APP ...nightly_cleanup '[0]'`` clears everything)."""
    days = settings.PHOTOS_RETENTION_DAYS if older_than_days is None else older_than_days
    cutoff = timezone.now() - dt.timedelta(days=days)
    media = Path(settings.MEDIA_ROOT)
    photos = exports = 0
    for photo in Photo.objects.filter(created_at__lt=cutoff).iterator(chunk_size=500):
        for relative in (photo.thumbnail, photo.original.name):
            if relative:
                (media / relative).unlink(missing_ok=True)
        photo.delete()
        photos += 1
    for export in Export.objects.filter(created_at__lt=cutoff).iterator(chunk_size=500):
        if export.path:
            (media / export.path).unlink(missing_ok=True)
        export.delete()
        exports += 1
    forgotten = owners.prune(dt.timedelta(days=days))
    log.info("nightly cleanup: removed %d photo(s) and %d export(s) older than %s, forgot %d unannounced task(s)",
             photos, exports, cutoff, forgotten)
    return {"photos": photos, "exports": exports}


def _when(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
