"""The project's app: built from settings.OFFLOAD (then the environment), once, with every
tasks.py of INSTALLED_APPS registered; and the command users run for workers."""

from __future__ import annotations

import subprocess
import sys

import pytest
from django.test import override_settings

from offload import ConfigError, Offload
from offload.contrib.django import conf
from tests.django.conftest import NAMESPACE, TEST_DIR, django_env
from tests.support import ROOT


def test_app_comes_from_the_settings_and_is_built_once() -> None:
    from offload.contrib.django import app, get_app

    assert isinstance(app, Offload)
    assert app is get_app()
    assert app.url.raw == f"sqlite:///{TEST_DIR / 'offload.db'}"
    assert app.namespace == NAMESPACE
    assert app.spec == "offload.contrib.django:app"
    # No SECRET given: one derived from SECRET_KEY, not SECRET_KEY itself.
    assert app.secret == conf.derived_secret().encode()
    assert b"tests-only-not-secret" not in app.secret


def test_tasks_modules_of_installed_apps_are_discovered() -> None:
    from offload.contrib.django import app

    assert {"tests.django.testapp.tasks.add", "tests.django.testapp.tasks.report"} <= set(app.registry)


def test_environment_fills_what_the_settings_leave_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFFLOAD_RESULTS", "redis://127.0.0.1:6379/3")
    monkeypatch.setenv("OFFLOAD_SECRET", "from-the-environment")
    with override_settings(OFFLOAD={"URL": "amqp://guest:guest@127.0.0.1:5672/"}, TIME_ZONE="Europe/Paris"):
        options = conf.app_options()
    assert options["url"] == "amqp://guest:guest@127.0.0.1:5672/"
    assert options["results"] == "redis://127.0.0.1:6379/3"
    assert options["secret"] == "from-the-environment"
    assert options["timezone"] == "Europe/Paris"
    with override_settings(OFFLOAD={"SECRET": None, "NAMESPACE": "stage"}):
        options = conf.app_options()
    assert options["secret"] is None and options["namespace"] == "stage"


def test_unknown_settings_are_refused() -> None:
    with override_settings(OFFLOAD={"URLS": "redis://"}), pytest.raises(ConfigError, match=r"unknown key.*URLS"):
        conf.app_options()


def test_a_worker_without_django_settings_says_what_is_missing() -> None:
    env = {k: v for k, v in django_env().items() if k != "DJANGO_SETTINGS_MODULE"}
    done = subprocess.run([sys.executable, "-m", "offload", "worker", "offload.contrib.django:app"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "set DJANGO_SETTINGS_MODULE" in done.stderr
    assert "Traceback" not in done.stderr


def test_pickle_without_a_secret_is_refused_in_the_settings() -> None:
    with override_settings(OFFLOAD={"SERIALIZER": "pickle", "SECRET": None}), \
            pytest.raises(ConfigError, match=r"'pickle' needs a secret"):
        conf.app_options()
    with override_settings(OFFLOAD={"SERIALIZER": "pickle"}):
        assert Offload("memory://", **{k: v for k, v in conf.app_options().items() if k != "url"}).codec.serializer.name == "pickle"
