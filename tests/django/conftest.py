"""Django set up once for tests/django: the settings in tests/django/settings.py, a database
and a broker in a fresh directory, migrated; and real workers loading the project's app as
users do (``offload worker offload.contrib.django:app`` with DJANGO_SETTINGS_MODULE)."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_module
from tests.support import ROOT, OffloadProcess

django = require_module("django", "pip install 'offload[django]'")

TEST_DIR = Path(tempfile.mkdtemp(prefix="offload-django-"))
NAMESPACE = f"dj{uuid.uuid4().hex[:10]}"
SETTINGS = "tests.django.settings"

os.environ["DJANGO_SETTINGS_MODULE"] = SETTINGS
os.environ["DJANGO_TEST_DIR"] = str(TEST_DIR)
os.environ["DJANGO_TEST_NAMESPACE"] = NAMESPACE
django.setup()


def django_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOAD_")}
    env.update({"DJANGO_SETTINGS_MODULE": SETTINGS, "DJANGO_TEST_DIR": str(TEST_DIR),
                "DJANGO_TEST_NAMESPACE": NAMESPACE, "PYTHONPATH": str(ROOT), **extra})
    return env


def start_django_worker(*args: str) -> OffloadProcess:
    return OffloadProcess(["worker", "offload.contrib.django:app", *args], django_env(), ready_line="worker ready")


@pytest.fixture(scope="session", autouse=True)
def _database() -> Iterator[None]:
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    yield
    from offload.contrib.django import app

    app.close()
    shutil.rmtree(TEST_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def worker() -> Iterator[OffloadProcess]:
    """A thread-pool worker on the default queue, for the whole session."""
    process = start_django_worker("-c", "4")
    yield process
    process.stop()
