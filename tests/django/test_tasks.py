"""Real workers started as users start them, on the project's database; enqueueing after commit."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from django.db import transaction

from offload.contrib.django import delay_on_commit
from tests.django.conftest import start_django_worker
from tests.django.testapp.tasks import add, count_users
from tests.support import OffloadProcess


def test_a_worker_runs_tasks_with_django_set_up(worker: OffloadProcess) -> None:
    User.objects.create_user("counted")
    assert add.delay(2, 3).get(timeout=30) == 5
    # The task queried the project's database from the worker process.
    assert count_users.delay().get(timeout=30) == User.objects.count()


def test_process_pool_children_load_the_django_app() -> None:
    procs = start_django_worker("-q", "procs", "--pool", "process", "-c", "1")
    try:
        assert count_users.options(queue="procs").delay().get(timeout=60) == User.objects.count()
    finally:
        procs.stop()


def test_delay_on_commit_waits_for_the_commit(worker: OffloadProcess) -> None:
    with transaction.atomic():
        r = delay_on_commit(add, 20, 22)
        # Nothing is enqueued yet: no state exists for the id handed out.
        with pytest.raises(LookupError):
            r.state()
    assert r.get(timeout=30) == 42


def test_delay_on_commit_never_enqueues_on_rollback(worker: OffloadProcess) -> None:
    class Abort(Exception):
        pass

    with pytest.raises(Abort), transaction.atomic():
        r = delay_on_commit(add.options(priority=5), 1, 1)
        raise Abort
    with pytest.raises(LookupError):
        r.state()


def test_delay_on_commit_outside_a_transaction_enqueues_at_once(worker: OffloadProcess) -> None:
    r = delay_on_commit(add, 1, 2)
    assert r.state().name == "tests.django.testapp.tasks.add"
    assert r.get(timeout=30) == 3
