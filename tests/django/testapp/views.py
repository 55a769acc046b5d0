from __future__ import annotations

from django.contrib import messages
from django.http import HttpRequest, HttpResponse


def _page(request: HttpRequest) -> HttpResponse:
    lines = [f"{m.level_tag}: {m.message}" for m in messages.get_messages(request)]
    return HttpResponse("\n".join(lines), content_type="text/plain")


def home(request: HttpRequest) -> HttpResponse:
    return _page(request)


async def async_home(request: HttpRequest) -> HttpResponse:
    from asgiref.sync import sync_to_async

    return await sync_to_async(_page)(request)
