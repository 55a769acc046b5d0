from __future__ import annotations

from django.urls import include, path

from examples.photos.gallery import views

urlpatterns = [
    path("", views.index, name="index"),
    path("upload", views.upload, name="upload"),
    path("export", views.export, name="export"),
    path("photos/<int:photo_id>/thumbnail", views.thumbnail, name="thumbnail"),
    path("exports/<str:signed>", views.download, name="download"),
    path("switch/<str:username>", views.switch_user, name="switch-user"),
    path("offload/", include("offload.contrib.django.urls")),
]
