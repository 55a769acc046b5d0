"""The record of tasks started for users (`OwnedTask`)."""

import django.utils.timezone
from django.db import migrations, models


class Migration(migrations.Migration):

    initial = True

    dependencies = [
    ]

    operations = [
        migrations.CreateModel(
            name='OwnedTask',
            fields=[
                ('task_id', models.CharField(max_length=64, primary_key=True, serialize=False)),
                ('owner', models.CharField(help_text='str(user.pk)', max_length=150)),
                ('label', models.CharField(max_length=200)),
                ('status', models.CharField(blank=True, help_text='the final status, once finished', max_length=16)),
                ('detail', models.TextField(blank=True, help_text='the error, or the message a task returned')),
                ('created_at', models.DateTimeField(default=django.utils.timezone.now)),
                ('finished_at', models.DateTimeField(blank=True, null=True)),
            ],
            options={
                'indexes': [models.Index(fields=['owner', 'finished_at'], name='offload_owned_owner_idx')],
            },
        ),
    ]
