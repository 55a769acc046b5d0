"""The pages: upload (answers at once; thumbnails arrive in the page through offload.js),
export (a link arrives the same way, by email, and as a message on the next page), and the
private downloads."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import get_user_model, login
from django.core.files.uploadedfile import UploadedFile
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, HttpResponseForbidden, JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from examples.photos.gallery.links import LinkRefused, check_link, make_link
from examples.photos.gallery.models import Export, Photo
from examples.photos.gallery.tasks import export_stats, exports_channel, make_thumbnail
from offload.contrib.django import app, for_user
from offload.tokens import make_channel_token

log = logging.getLogger("examples.photos")

#: The accounts of the demo: visitors are signed in as the first; the second shows what
#: another user cannot see.
DEMO_USERS = {"demo": "demo@example.com", "bob": "bob@example.com"}


def ensure_demo_users() -> None:
    user_model = get_user_model()
    for username, email in DEMO_USERS.items():
        user, created = user_model.objects.get_or_create(username=username, defaults={"email": email})
        if created:
            user.set_unusable_password()
            user.save()


@require_GET
def index(request: HttpRequest) -> HttpResponse:
    if not request.user.is_authenticated:
        login(request, get_user_model().objects.get(username="demo"), backend="django.contrib.auth.backends.ModelBackend")
    user = request.user
    photos = list(Photo.objects.filter(owner=user)[:60])
    exports = []
    for export in Export.objects.filter(owner=user, finished_at__isnull=False)[:5]:
        link, expires_at = make_link(export.pk, user.pk)
        exports.append({"export": export, "link": link, "expires_at": expires_at})
    channel = exports_channel(user.pk)
    return render(request, "gallery/index.html", {
        "photos": photos, "exports": exports, "users": list(DEMO_USERS), "channel": channel,
        "channel_token": make_channel_token(app, channel), "link_max_age": int(settings.PHOTOS_LINK_MAX_AGE),
    })


@require_POST
async def upload(request: HttpRequest) -> JsonResponse:
    """Store each file and enqueue its thumbnail; answer with the task ids and tokens."""
    user = await request.auser()
    if not user.is_authenticated:
        return JsonResponse({"detail": "sign in first"}, status=403)
    # Reading the multipart body and writing the files is blocking work: off the event loop.
    stored = await sync_to_async(_store_uploads)(request, user)
    answers: list[dict[str, Any]] = []
    for name, photo, error in stored:
        if photo is None:
            answers.append({"name": name, "error": error})
            continue
        # Owned (the task's state names its user) but not announced: the page shows it live.
        r = await for_user(user, make_thumbnail, announce=False).adelay(photo.pk)
        await Photo.objects.filter(pk=photo.pk).aupdate(task_id=r.id)
        answers.append({"name": name, "photo": photo.pk, "task": r.id, "token": r.token()})
    return JsonResponse({"photos": answers})


def _store_uploads(request: HttpRequest, user: Any) -> list[tuple[str, Photo | None, str]]:
    stored: list[tuple[str, Photo | None, str]] = []
    files: list[UploadedFile] = request.FILES.getlist("photos")
    for uploaded in files:
        name = Path(uploaded.name or "unnamed").name
        if uploaded.size is not None and uploaded.size > settings.PHOTOS_MAX_FILE_BYTES:
            stored.append((name, None, f"too large: {uploaded.size // 2**20} MB (at most {settings.PHOTOS_MAX_FILE_BYTES // 2**20} MB)"))
            continue
        if not uploaded.size:
            stored.append((name, None, "empty file"))
            continue
        photo = Photo(owner=user, name=name[:255])
        photo.original.save(name, uploaded, save=True)
        stored.append((name, photo, ""))
    return stored


@require_POST
async def export(request: HttpRequest) -> JsonResponse:
    user = await request.auser()
    if not user.is_authenticated:
        return JsonResponse({"detail": "sign in first"}, status=403)
    row = await Export.objects.acreate(owner=user)
    r = await for_user(user, export_stats, label="your newsletter statistics export").adelay(row.pk)
    await Export.objects.filter(pk=row.pk).aupdate(task_id=r.id)
    return JsonResponse({"export": row.pk, "task": r.id, "token": r.token()})


@require_GET
def thumbnail(request: HttpRequest, photo_id: int) -> FileResponse:
    photo = Photo.objects.filter(pk=photo_id, owner_id=request.user.pk).exclude(thumbnail="").first()
    if photo is None:
        raise Http404("no such thumbnail")
    response = FileResponse((Path(settings.MEDIA_ROOT) / photo.thumbnail).open("rb"))
    response["Cache-Control"] = "private, max-age=86400"
    return response


@require_GET
def download(request: HttpRequest, signed: str) -> HttpResponse:
    try:
        export_id = check_link(signed, request.user.pk if request.user.is_authenticated else None)
    except LinkRefused as e:
        if e.status == 404:
            raise Http404(str(e)) from None
        return HttpResponseForbidden(str(e), content_type="text/plain")
    export = Export.objects.filter(pk=export_id, owner_id=request.user.pk).exclude(path="").first()
    path = Path(settings.MEDIA_ROOT) / export.path if export is not None else None
    if path is None or not path.exists():
        raise Http404("this export was removed: export again")
    response = FileResponse(path.open("rb"), as_attachment=True, filename="newsletter-statistics.csv",
                            content_type="text/csv")
    response["Cache-Control"] = "private, no-store"
    return response


@require_POST
def switch_user(request: HttpRequest, username: str) -> HttpResponse:
    """The demo's way to become the other user (there are no passwords)."""
    if username not in DEMO_USERS:
        raise Http404("no such demo user")
    login(request, get_user_model().objects.get(username=username), backend="django.contrib.auth.backends.ModelBackend")
    return redirect("index")
