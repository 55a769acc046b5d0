from django.urls import include, path

from tests.django.testapp import views

urlpatterns = [
    path("", views.home, name="home"),
    path("async/", views.async_home, name="async-home"),
    path("jobs/offload/", include("offload.contrib.django.urls")),
]
