"""Settings of the photo site. Everything it writes lives under ``$PHOTOS_DATA_DIR`` (default:
var/photos in the repository): the site's database, the uploads, thumbnails and exports, and
the embedded broker unless ``$OFFLOAD_URL`` names another (Redis, or RabbitMQ with
``$OFFLOAD_RESULTS``)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = Path(os.environ.get("PHOTOS_DATA_DIR") or ROOT / "var" / "photos")

# A demo's key: real sites read theirs from the environment and never commit it.
SECRET_KEY = os.environ.get("PHOTOS_SECRET_KEY", "photos-demo-only-not-a-secret")
DEBUG = os.environ.get("PHOTOS_DEBUG") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]
USE_TZ = True
TIME_ZONE = "UTC"
ROOT_URLCONF = "examples.photos.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "offload.contrib.django",
    "examples.photos.gallery",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "offload.contrib.django.middleware.AnnounceMiddleware",
]
TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates",
    "APP_DIRS": True,
    "OPTIONS": {"context_processors": [
        "django.template.context_processors.request",
        "django.contrib.auth.context_processors.auth",
        "django.contrib.messages.context_processors.messages",
    ]},
}]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": str(DATA_DIR / "site.sqlite3"),
        # The site and its workers write this file at once: WAL, a busy timeout, and
        # transactions that take the write lock up front instead of failing half-way.
        "OPTIONS": {"timeout": 20, "transaction_mode": "IMMEDIATE", "init_command": "PRAGMA journal_mode=WAL;"},
    }
}
MEDIA_ROOT = DATA_DIR / "media"

# DSLR photos: a dozen 10 MB files in one request. Files above 4 MB go to a temporary file
# while they arrive instead of memory.
FILE_UPLOAD_MAX_MEMORY_SIZE = 4 * 1024 * 1024
DATA_UPLOAD_MAX_MEMORY_SIZE = 32 * 1024 * 1024
DATA_UPLOAD_MAX_NUMBER_FILES = 200
PHOTOS_MAX_FILE_BYTES = 64 * 1024 * 1024

EMAIL_BACKEND = "django.core.mail.backends.console.EmailBackend"
DEFAULT_FROM_EMAIL = "photos@localhost"

#: Where links in emails point (run.py sets it to the address it serves).
PHOTOS_SITE_URL = os.environ.get("PHOTOS_SITE_URL", "http://127.0.0.1:8000")
#: How long an export's download link works, in seconds.
PHOTOS_LINK_MAX_AGE = float(os.environ.get("PHOTOS_LINK_MAX_AGE", "3600"))
#: The nightly cleanup removes thumbnails and exports older than this many days.
PHOTOS_RETENTION_DAYS = float(os.environ.get("PHOTOS_RETENTION_DAYS", "7"))
#: Rows of newsletter statistics the demo seeds.
PHOTOS_SEED_ROWS = int(os.environ.get("PHOTOS_SEED_ROWS", "500000"))

OFFLOAD = {
    "URL": os.environ.get("OFFLOAD_URL") or f"sqlite:///{DATA_DIR / 'offload.db'}",
    "NAMESPACE": os.environ.get("OFFLOAD_NAMESPACE") or "photos",
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)-7s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    # Not propagated: the workers' root logger prints too, and each line should appear once.
    "loggers": {"examples.photos": {"handlers": ["console"], "level": "INFO", "propagate": False}},
}
