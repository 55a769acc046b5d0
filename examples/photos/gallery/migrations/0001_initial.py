"""Photos, newsletter statistics and exports."""

import django.db.models.deletion
import django.utils.timezone
from django.conf import settings
from django.db import migrations, models

import examples.photos.gallery.models


class Migration(migrations.Migration):

    initial = True

    dependencies = [
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.CreateModel(
            name='NewsletterStat',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('newsletter', models.CharField(max_length=80)),
                ('sent_on', models.DateField()),
                ('recipients', models.PositiveIntegerField()),
                ('opened', models.PositiveIntegerField()),
                ('clicked', models.PositiveIntegerField()),
                ('unsubscribed', models.PositiveIntegerField()),
                ('bounced', models.PositiveIntegerField()),
            ],
        ),
        migrations.CreateModel(
            name='Export',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('task_id', models.CharField(blank=True, max_length=64)),
                ('path', models.CharField(blank=True, help_text='path under MEDIA_ROOT, once written', max_length=255)),
                ('rows', models.PositiveIntegerField(default=0)),
                ('created_at', models.DateTimeField(db_index=True, default=django.utils.timezone.now)),
                ('finished_at', models.DateTimeField(blank=True, null=True)),
                ('owner', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='exports', to=settings.AUTH_USER_MODEL)),
            ],
            options={
                'ordering': ['-created_at', '-pk'],
            },
        ),
        migrations.CreateModel(
            name='Photo',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('name', models.CharField(help_text='the file name as uploaded', max_length=255)),
                ('original', models.FileField(upload_to=examples.photos.gallery.models._original_path)),
                ('thumbnail', models.CharField(blank=True, help_text='path under MEDIA_ROOT', max_length=255)),
                ('error', models.CharField(blank=True, max_length=500)),
                ('task_id', models.CharField(blank=True, max_length=64)),
                ('created_at', models.DateTimeField(db_index=True, default=django.utils.timezone.now)),
                ('owner', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='photos', to=settings.AUTH_USER_MODEL)),
            ],
            options={
                'ordering': ['-created_at', '-pk'],
            },
        ),
    ]
