"""``path("offload/", include("offload.contrib.django.urls"))``: the gateway under any prefix.
Names live in the ``offload`` namespace: ``reverse("offload:task", args=[r.id])``,
``{% url "offload:script" %}`` for offload.js (which then finds the rest by itself)."""

from __future__ import annotations

from django.urls import path

from offload.contrib.django import views

app_name = "offload"

urlpatterns = [
    path("tasks/<str:task_id>/events", views.task_events, name="task-events"),
    path("tasks/<str:task_id>", views.task, name="task"),
    path("wait", views.wait, name="wait"),
    path("channels/<str:name>/events", views.channel_events, name="channel-events"),
    path("channels/<str:name>", views.channel, name="channel"),
    path("offload.js", views.script, name="script"),
    path("health", views.health, name="health"),
    path("metrics", views.metrics, name="metrics"),
]
