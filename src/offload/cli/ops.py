"""The commands of operations: ``status``, ``ping``, ``purge``, ``dead``."""

from __future__ import annotations

import datetime as dt
import json
import signal
import sys
import threading
from typing import Any

import click

from offload import admin
from offload.app import Offload
from offload.cli.common import EXIT_TASK_FAILED, EXIT_USAGE, fail, user_errors
from offload.loading import load_app
from offload.workers import consuming


@click.command(epilog="Examples:\n\n\b\n  offload status app\n  offload status app --watch\n"
                       "  offload status app --json\n  offload status app 3kTMd9o0Zr9Zl2x7VvXbQA")
@click.argument("app_spec", metavar="APP")
@click.argument("task_id", required=False)
@click.option("--watch", is_flag=True, help="Refresh in place every --interval seconds until Ctrl-C (piped: one frame after another).")
@click.option("--interval", type=click.FloatRange(min=0.2), default=2.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the same as one JSON object.")
@user_errors
def status(app_spec: str, task_id: str | None, watch: bool, interval: float, as_json: bool) -> None:
    """Show the live workers and the queues: depths, running, scheduled and dead tasks (or
    one task's state)."""
    app = load_app(app_spec)
    if task_id:
        show_task(app, task_id, as_json)
        return
    def overview() -> dict[str, Any]:
        return app._portal.run(admin.overview(app))

    if as_json:
        click.echo(json.dumps(overview()))
        return
    if not watch:
        click.echo(render_overview(overview()), nl=False)
        return
    # Ctrl-C ends the watch between frames: a KeyboardInterrupt raised in the middle of a read
    # on the app's loop thread could leave that read, and the exit, waiting on it. A second
    # Ctrl-C interrupts at once, for a read that hangs.
    stop = threading.Event()
    previous = signal.getsignal(signal.SIGINT) or signal.default_int_handler
    signal.signal(signal.SIGINT, lambda *_: interrupt_twice(stop, previous))
    try:
        if not sys.stdout.isatty():
            # Piped or logged: one frame after the other, as `watch` would print them.
            while not stop.is_set():
                click.echo(render_overview(overview()))
                stop.wait(interval)
            return
        from rich.live import Live  # only --watch on a terminal draws in place

        with Live(auto_refresh=False, screen=False) as live:
            while not stop.is_set():
                live.update(render_overview(overview()), refresh=True)
                stop.wait(interval)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, previous)
        app.close()


def interrupt_twice(stop: threading.Event, previous: Any) -> None:
    """The first Ctrl-C asks the watch to end after the frame it draws; the second raises."""
    if stop.is_set():
        signal.signal(signal.SIGINT, previous)
        raise KeyboardInterrupt
    stop.set()


def show_task(app: Offload, task_id: str, as_json: bool) -> None:
    state = app.result(task_id).state()
    if as_json:
        click.echo(json.dumps(state.to_record(), default=str))
        return
    for field in ("id", "name", "status", "progress", "message", "attempts", "queued_at", "started_at", "finished_at"):
        click.echo(f"{field:12} {getattr(state, field)}")
    if state.error:
        click.echo(f"{'error':12} {state.error['type']}: {state.error['message']}")
    if state.done and state.status.value == "succeeded":
        click.echo(f"{'result':12} {json.dumps(state.result, default=str)}")


def render_overview(view: dict[str, Any]) -> str:
    now = dt.datetime.now(dt.UTC)
    lines = [f"namespace {view['namespace']} on {view['broker']}"]
    for queue, depth in sorted(view["queues"].items()) or [("(no queued tasks)", 0)]:
        lines.append(f"  queue {queue:20} {depth:>8}")
    lines.append(f"  {'running':26} {view['running']:>8}")
    lines.append(f"  {'scheduled':26} {view['scheduled']:>8}")
    lines.append(f"  {'dead (failed, expired, malformed)':26} {view['dead']:>8}")
    workers = view["workers"]
    lines.append(f"workers: {len(workers)} live" if workers else "workers: none live")
    for w in workers:
        seen = (now - dt.datetime.fromisoformat(w["last_seen"])).total_seconds()
        lines.append(f"  {w['hostname']:20} pid {w['pid']:<8} {','.join(w['queues']):20} "
                     f"running {len(w['running'])}/{w['concurrency']:<4} seen {max(seen, 0):.0f} s ago")
    return "\n".join(lines) + "\n"


@click.command(epilog="Examples:\n\n\b\n  offload ping app\n  offload ping app -q exports --min-workers 2\n"
                      "  offload ping app --hostname \"$(hostname)\"")
@click.argument("app_spec", metavar="APP")
@click.option("-q", "--queue", help="Count only the workers that consume this queue. [default: any]")
@click.option("--min-workers", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--hostname", help="Count only the workers on this host (a container, a pod).")
@user_errors
def ping(app_spec: str, queue: str | None, min_workers: int, hostname: str | None) -> None:
    """Exit 0 when at least --min-workers live workers consume QUEUE, else 1, with one line
    saying why (69 when the broker cannot be reached): a check for Nagios, systemd or a
    Kubernetes probe."""
    app = load_app(app_spec)
    live = [w for w in consuming(app.workers(), queue) if hostname is None or w.hostname == hostname]
    where = (f" of queue {queue!r}" if queue else "") + (f" on {hostname}" if hostname else "")
    if len(live) < min_workers:
        click.echo(f"CRITICAL: {len(live)} live worker{'s' if len(live) != 1 else ''}{where} in namespace "
                   f"{app.namespace!r}, fewer than {min_workers}")
        sys.exit(EXIT_TASK_FAILED)
    click.echo(f"OK: {len(live)} live worker{'s' if len(live) != 1 else ''}{where} in namespace {app.namespace!r}")


@click.command(epilog="Example:\n\n\b\n  offload purge app images --yes")
@click.argument("app_spec", metavar="APP")
@click.argument("queue")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@user_errors
def purge(app_spec: str, queue: str, yes: bool) -> None:
    """Remove every waiting task of QUEUE (running ones are not touched)."""
    app = load_app(app_spec)
    if not yes and sys.stdin.isatty():
        click.confirm(f"remove every waiting task of queue {queue!r} in namespace {app.namespace!r}?", abort=True)
    removed = app._portal.run(admin.purge(app, queue))
    click.echo(f"removed {removed} task(s) from {queue}")


@click.command(epilog="Examples:\n\n\b\n  offload dead app\n  offload dead app --replay 3kTMd9o0Zr9Zl2x7VvXbQA\n  offload dead app --replay all")
@click.argument("app_spec", metavar="APP")
@click.option("--replay", "replay_id", metavar="ID|all", help="Enqueue this dead letter (or all) again.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(min=1))
@user_errors
def dead(app_spec: str, replay_id: str | None, limit: int) -> None:
    """List dead letters (expired, malformed, tampered, finally failed) or replay them."""
    app = load_app(app_spec)
    if replay_id:
        ids = app._portal.run(admin.replay(app, None if replay_id == "all" else [replay_id]))
        if not ids and replay_id != "all":
            fail(f"no dead letter with id {replay_id!r}", EXIT_USAGE)
        click.echo(f"replayed {len(ids)} task(s)")
        return
    letters = app._portal.run(admin.dead_letters(app, limit))
    if not letters:
        click.echo("no dead letters")
    for d in letters:
        when = dt.datetime.fromtimestamp(d.died_at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        click.echo(f"{d.id}  {when}  {d.queue:12} {d.reason}")
