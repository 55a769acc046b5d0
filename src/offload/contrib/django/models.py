"""What the announcements middleware reads: the tasks users started and have not yet been told about."""

from __future__ import annotations

from django.db import models
from django.utils import timezone


class OwnedTask(models.Model):
    """A task started for a user (`delay_for`). The worker fills in ``finished_at`` when the
    task ends; the middleware tells the user on their next page and deletes the row."""

    task_id = models.CharField(max_length=64, primary_key=True)
    owner = models.CharField(max_length=150, help_text="str(user.pk)")
    label = models.CharField(max_length=200)
    status = models.CharField(max_length=16, blank=True, help_text="the final status, once finished")
    detail = models.TextField(blank=True, help_text="the error, or the message a task returned")
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        # The middleware's one query per request: this user's finished tasks.
        indexes = [models.Index(fields=["owner", "finished_at"], name="offload_owned_owner_idx")]

    def __str__(self) -> str:
        return f"{self.label} ({self.task_id}) for {self.owner}: {self.status or 'running'}"
