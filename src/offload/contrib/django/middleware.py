"""`AnnounceMiddleware`: tells a user, once, on their next page, that a task they started ended.

Put it after ``AuthenticationMiddleware`` and ``MessageMiddleware``. Per request from a signed-in
user it makes one query on an index (``owner``, ``finished_at``); it skips the gateway's views
(long polls must stay cheap) and requests other than GET.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.contrib import messages
from django.http import HttpRequest, HttpResponseBase
from django.utils.deprecation import MiddlewareMixin

from offload.result import Status

#: Set on a view function to keep this middleware away from it.
SKIP_ATTRIBUTE = "offload_skip_announce"


class AnnounceMiddleware(MiddlewareMixin):
    """Turns the finished rows of `OwnedTask` into ``django.contrib.messages`` messages."""

    def process_view(self, request: HttpRequest, view_func: Callable[..., Any], view_args: Any,
                     view_kwargs: Any) -> HttpResponseBase | None:
        if request.method != "GET" or getattr(view_func, SKIP_ATTRIBUTE, False):
            return None
        user = getattr(request, "user", None)
        if user is None or not user.is_authenticated:
            return None
        announce(request, str(user.pk))
        return None


def announce(request: HttpRequest, owner: str) -> int:
    """Add a message for each finished task of ``owner``; returns how many."""
    from offload.contrib.django.models import OwnedTask

    finished = list(OwnedTask.objects.filter(owner=owner, finished_at__isnull=False).order_by("finished_at"))
    told = 0
    for row in finished:
        # Deleting first makes it exactly once: of two requests racing for a row, only the one
        # whose delete removed it speaks.
        deleted, _ = OwnedTask.objects.filter(pk=row.pk).delete()
        if deleted:
            level, text = message_for(row.label, row.status, row.detail)
            messages.add_message(request, level, text, extra_tags=f"offload {row.status}", fail_silently=True)
            told += 1
    return told


def message_for(label: str, status: str, detail: str) -> tuple[int, str]:
    label = label[:1].upper() + label[1:]
    if status == Status.SUCCEEDED:
        return messages.SUCCESS, f"{label}: {detail}" if detail else f"{label} finished."
    if status == Status.FAILED:
        return messages.ERROR, f"{label} failed: {detail}" if detail else f"{label} failed."
    return messages.WARNING, f"{label} was {status} before it could finish."
