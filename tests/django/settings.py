"""The smallest Django project that uses offload.contrib.django, for tests/django. The database
and the broker live in ``$DJANGO_TEST_DIR`` (set by the tests' conftest, and inherited by the
worker processes they start)."""

from __future__ import annotations

import os
from pathlib import Path

import django

_DIR = Path(os.environ.get("DJANGO_TEST_DIR", "/tmp/offload-django-tests"))

SECRET_KEY = "tests-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
TIME_ZONE = "UTC"
ROOT_URLCONF = "tests.django.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "offload.contrib.django",
    "tests.django.testapp",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "offload.contrib.django.middleware.AnnounceMiddleware",
]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": str(_DIR / "django.sqlite3"),
        # The web process (the test) and the worker write this file at once.
        "OPTIONS": {"timeout": 20},
    }
}
if django.VERSION >= (5, 1):  # these two options came with Django 5.1
    DATABASES["default"]["OPTIONS"].update({"transaction_mode": "IMMEDIATE", "init_command": "PRAGMA journal_mode=WAL;"})
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast test users
TEMPLATES = [{"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True, "OPTIONS": {
    "context_processors": ["django.contrib.messages.context_processors.messages"]}}]
OFFLOAD = {
    "URL": f"sqlite:///{_DIR / 'offload.db'}",
    "NAMESPACE": os.environ.get("DJANGO_TEST_NAMESPACE", "django-tests"),
}
