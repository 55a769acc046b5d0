"""``offload send``: enqueue a task from the shell, and optionally wait for it with a progress bar."""

from __future__ import annotations

import difflib
import json
from typing import Any

import click

from offload import admin
from offload.app import Offload
from offload.cli.common import json_arg, stderr_console, user_errors
from offload.loading import load_app


@click.command(epilog="Examples:\n\n\b\n  offload send app pkg.tasks.add '[1, 2]' --wait\n  offload send app pkg.tasks.export '[]' --kwargs '{\"n\": 500000}' -q exports")
@click.argument("app_spec", metavar="APP")
@click.argument("name")
@click.argument("args", default="[]")
@click.option("--kwargs", "kwargs_json", default="{}", help="Keyword arguments as a JSON object.")
@click.option("-q", "--queue", help="Queue (default: the task's own).")
@click.option("--priority", type=click.IntRange(0, 9))
@click.option("--countdown", type=float, help="Seconds before it may start.")
@click.option("--wait", "wait_", is_flag=True, help="Wait for the result, with a progress bar.")
@click.option("--timeout", type=float, help="With --wait: give up after this many seconds.")
@click.option("--unregistered", is_flag=True, help="Send NAME although APP does not register it (its code lives only on the workers).")
@user_errors
def send(app_spec: str, name: str, args: str, kwargs_json: str, queue: str | None, priority: int | None,
         countdown: float | None, wait_: bool, timeout: float | None, unregistered: bool) -> None:
    """Enqueue task NAME with ARGS (a JSON list) and print its id."""
    positional = json_arg(args, "ARGS")
    if not isinstance(positional, list):
        # One object or number is not wrapped: `'{"n": 5}'` meant --kwargs more often than not.
        raise click.BadParameter(f"ARGS must be a JSON list of positional arguments, got {args!r}; keywords go in --kwargs")
    keywords = json_arg(kwargs_json, "--kwargs")
    if not isinstance(keywords, dict):
        raise click.BadParameter("--kwargs must be a JSON object")
    app = load_app(app_spec)
    if name not in app.registry and not unregistered:
        raise click.BadParameter(_unknown_task_message(app, name), param_hint="NAME")
    opts = {k: v for k, v in (("queue", queue), ("priority", priority), ("countdown", countdown)) if v is not None}
    result = app.ref(name).options(**opts).delay(*positional, **keywords)
    click.echo(result.id)
    if wait_:
        value = app._portal.run(_wait_with_progress(app, result.id, timeout))
        click.echo(json.dumps(value, default=str))


def _unknown_task_message(app: Offload, name: str) -> str:
    close = difflib.get_close_matches(name, list(app.registry), n=3, cutoff=0.9)  # names share long prefixes
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"{app.spec or 'the app'} registers no task named {name!r}{hint} (--unregistered sends it anyway)"


async def _wait_with_progress(app: Offload, task_id: str, timeout: float | None) -> Any:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), transient=True, console=stderr_console()) as bar:
        row = bar.add_task("queued", total=1.0)
        async for state in admin.follow(app, task_id, timeout):
            bar.update(row, completed=state.progress or 0.0, description=state.message or state.status.value)
            if state.done:
                return state.outcome()
    return await app.result(task_id).wait(0.001)  # timed out: raises ResultTimeout
