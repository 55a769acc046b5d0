"""The ``offload`` command. It parses, loads the app, and calls the library; nothing more.

A user mistake (a bad APP, an unreachable broker, bad JSON) is one line on stderr and a
non-zero exit code, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click

from offload import admin, loops
from offload.app import Offload
from offload.errors import BrokerUnavailable, OffloadError, TaskFailed
from offload.loading import load_app

# Exit codes (sysexits.h where one fits).
EXIT_OK = 0
EXIT_TASK_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69
EXIT_SOFTWARE = 70

F = TypeVar("F", bound=Callable[..., Any])


def _fail(message: str, code: int) -> None:
    click.echo(f"offload: error: {message}", err=True)
    sys.exit(code)


def user_errors(fn: F) -> F:
    """Turn the errors a user can cause into one line and an exit code."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BrokerUnavailable as e:
            _fail(str(e), EXIT_UNAVAILABLE)
        except TaskFailed as e:
            _fail(f"task failed: {e}", EXIT_TASK_FAILED)
        except LookupError as e:  # KeyError's str() adds quotes; show the message itself
            _fail(str(e.args[0]) if e.args else str(e), EXIT_USAGE)
        except OffloadError as e:
            _fail(str(e), EXIT_USAGE)
        except ImportError as e:
            _fail(f"cannot load the app: {e}", EXIT_USAGE)

    return wrapper  # type: ignore[return-value]


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", stream=sys.stderr
    )


LOOP_OPTION = click.option(
    "--loop", type=click.Choice(loops.LOOP_NAMES), default=None,
    help=f"Event loop: uvloop when installed (auto), or asyncio's own. [default: ${loops.LOOP_ENV}, else auto]",
)

APP_HELP = ("APP is module:attribute (or a module holding `app`), e.g. myproject.tasks:app, or "
            "module:function() to build the app by calling a function, e.g. myproject.tasks:create_app().")


@click.group(epilog=APP_HELP)
@click.version_option(package_name="offload")
def main() -> None:
    """offload: background tasks for Python web applications."""


@main.command(epilog="Examples:\n\n\b\n  offload worker photos.tasks:app\n  offload worker photos.tasks -q images,default -c 4 --pool process")
@click.argument("app_spec", metavar="APP")
@click.option("-q", "--queues", default="default", show_default=True, help="Comma-separated queues, in order of preference.")
@click.option("-c", "--concurrency", type=click.IntRange(min=1), help="Tasks at once (default: 8 threads, CPUs processes, 100 async).")
@click.option("--pool", type=click.Choice(["thread", "process", "async"]), default="thread", show_default=True, help="Where sync tasks run; async tasks always run on the event loop.")
@click.option("--prefetch", type=click.IntRange(min=0), help="Messages leased beyond the running ones (default: concurrency).")
@click.option("--burst", is_flag=True,
              help="Exit once nothing in the queues is ready and nothing scheduled there (a retry, a countdown) "
                   "comes due within 1 s; later ones are left for the next run.")
@click.option("--connect-timeout", type=click.FloatRange(min=0), metavar="SECONDS",
              help="At start-up, retry an unreachable broker for at most this long, then exit 69; 0 tries once. "
                   "[default: as long as it takes; 30 with --burst]")
@click.option("--grace", type=float, default=30.0, show_default=True, help="Seconds running tasks get to finish on SIGTERM/SIGINT.")
@click.option("--max-tasks-per-child", type=click.IntRange(min=1), help="Replace a process-pool child after this many tasks.")
@click.option("--beat", "with_beat", is_flag=True, help="Also run the periodic scheduler in this worker (small sites).")
@click.option("--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"]))
@LOOP_OPTION
@user_errors
def worker(app_spec: str, queues: str, concurrency: int | None, pool: str, prefetch: int | None, burst: bool,
           connect_timeout: float | None, grace: float, max_tasks_per_child: int | None, with_beat: bool, log_level: str,
           loop: str | None) -> None:
    """Run a worker: lease tasks from QUEUES and run them.

    A broker that cannot be reached at start-up is retried with backoff (0.5 s doubling to
    about 10 s), with a warning each time, until it answers; SIGTERM or SIGINT meanwhile exits 0."""
    from offload.worker import Worker

    _setup_logging(log_level)
    app = load_app(app_spec)
    w = Worker(
        app, queues=[q for q in queues.split(",") if q], concurrency=concurrency, pool=pool,  # type: ignore[arg-type]
        prefetch=prefetch, burst=burst, grace_s=grace, max_tasks_per_child=max_tasks_per_child,
        connect_timeout_s=connect_timeout,
    )

    async def serve() -> int:
        beat_task: asyncio.Task[None] | None = None

        def start_beat() -> None:
            nonlocal beat_task
            from offload.scheduler import Beat

            beat_task = asyncio.create_task(Beat(app).run())

        try:
            # The beat starts once the worker has reached the broker, not while it waits for it.
            return await w.run(on_ready=start_beat if with_beat else None)
        finally:
            if beat_task is not None:
                beat_task.cancel()
            await app.aclose()

    code = loops.run(serve(), loop)
    logging.shutdown()
    sys.stdout.flush()
    # Threads abandoned at the end of the grace period (stuck in C code) must not hold the exit.
    os._exit(code)


@main.command(epilog="Example:\n\n\b\n  offload beat photos.tasks:app")
@click.argument("app_spec", metavar="APP")
@click.option("--catch-up", is_flag=True, help="Enqueue runs missed while no beat was running (default: skip them).")
@click.option("--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"]))
@LOOP_OPTION
@user_errors
def beat(app_spec: str, catch_up: bool, log_level: str, loop: str | None) -> None:
    """Run the periodic scheduler. Several may run at once; each due run is enqueued once."""
    from offload.scheduler import Beat

    _setup_logging(log_level)
    app = load_app(app_spec)
    try:
        loops.run(Beat(app, catch_up=catch_up).run(handle_signals=True), loop)
    except KeyboardInterrupt:
        pass


@main.command(epilog="Examples:\n\n\b\n  offload gateway photos.tasks:app --port 8001\n"
                    "  offload gateway photos.tasks:app --cors-origin https://photos.example --no-access-log")
@click.argument("app_spec", metavar="APP")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int, help="0 picks a free port (logged at start).")
@click.option("--cors-origin", "cors_origins", multiple=True, help="An origin allowed to call the gateway from another site (repeatable).")
@click.option("--grace", type=float, default=5.0, show_default=True,
              help="Seconds requests still running at SIGTERM get to finish (streams end and long polls answer at once).")
@click.option("--access-log/--no-access-log", default=True, show_default=True, help="Log every request (tokens redacted).")
@click.option("--metrics/--no-metrics", default=None,
              help="Serve /metrics. [default: on a loopback --host, or with a metrics token; else off]")
@click.option("--metrics-token", envvar="OFFLOAD_METRICS_TOKEN", default=None, show_envvar=True,
              help="/metrics then answers 401 without Authorization: Bearer <this token>.")
@click.option("--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"]))
@user_errors
def gateway(app_spec: str, host: str, port: int, cors_origins: tuple[str, ...], grace: float, access_log: bool,
            metrics: bool | None, metrics_token: str | None, log_level: str) -> None:
    """Serve the browser gateway (long polling, SSE, offload.js, metrics) with uvicorn."""
    from offload.gateway.serve import serve

    _setup_logging(log_level)
    serve(load_app(app_spec), host=host, port=port, cors_origins=cors_origins, grace_s=grace, access_log=access_log,
          log_level=log_level, metrics=metrics, metrics_token=metrics_token or None)


def _json_arg(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"{what} is not valid JSON: {e}") from None


@main.command(epilog="Examples:\n\n\b\n  offload send app pkg.tasks.add '[1, 2]' --wait\n  offload send app pkg.tasks.export '[]' --kwargs '{\"n\": 500000}' -q exports")
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
    positional = _json_arg(args, "ARGS")
    if not isinstance(positional, list):
        # One object or number is not wrapped: `'{"n": 5}'` meant --kwargs more often than not.
        raise click.BadParameter(f"ARGS must be a JSON list of positional arguments, got {args!r}; keywords go in --kwargs")
    keywords = _json_arg(kwargs_json, "--kwargs")
    if not isinstance(keywords, dict):
        raise click.BadParameter("--kwargs must be a JSON object")
    app = load_app(app_spec)
    if name not in app.tasks and not unregistered:
        raise click.BadParameter(_unknown_task_message(app, name), param_hint="NAME")
    opts = {k: v for k, v in (("queue", queue), ("priority", priority), ("countdown", countdown)) if v is not None}
    result = app.ref(name).options(**opts).delay(*positional, **keywords)
    click.echo(result.id)
    if wait_:
        value = app._portal.run(_wait_with_progress(app, result.id, timeout))
        click.echo(json.dumps(value, default=str))


def _unknown_task_message(app: Offload, name: str) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(app.tasks), n=3, cutoff=0.9)  # names share long prefixes
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"{app.spec or 'the app'} registers no task named {name!r}{hint} (--unregistered sends it anyway)"


async def _wait_with_progress(app: Offload, task_id: str, timeout: float | None) -> Any:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), transient=True, console=_stderr_console()) as bar:
        row = bar.add_task("queued", total=1.0)
        async for state in admin.follow(app, task_id, timeout):
            bar.update(row, completed=state.progress or 0.0, description=state.message or state.status.value)
            if state.done:
                return state.outcome()
    return await app.result(task_id).wait(0.001)  # timed out: raises ResultTimeout


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


@main.command(epilog="Examples:\n\n\b\n  offload status app\n  offload status app 3kTMd9o0Zr9Zl2x7VvXbQA")
@click.argument("app_spec", metavar="APP")
@click.argument("task_id", required=False)
@user_errors
def status(app_spec: str, task_id: str | None) -> None:
    """Show queue depths, running, scheduled and dead tasks (or one task's state)."""
    app = load_app(app_spec)
    if task_id:
        state = app.result(task_id).state()
        for field in ("id", "name", "status", "progress", "message", "attempts", "queued_at", "started_at", "finished_at"):
            click.echo(f"{field:12} {getattr(state, field)}")
        if state.error:
            click.echo(f"{'error':12} {state.error['type']}: {state.error['message']}")
        if state.done and state.status.value == "succeeded":
            click.echo(f"{'result':12} {json.dumps(state.result, default=str)}")
        return
    stats = app._portal.run(admin.status(app))
    click.echo(f"namespace {app.namespace} on {app.url.masked}")
    for queue, depth in sorted(stats.queued.items()) or [("(no queued tasks)", 0)]:
        click.echo(f"  queue {queue:20} {depth:>8}")
    click.echo(f"  {'running':26} {stats.running:>8}")
    click.echo(f"  {'scheduled':26} {stats.scheduled:>8}")
    click.echo(f"  {'dead (failed, expired, malformed)':26} {stats.dead:>8}")


@main.command(epilog="Example:\n\n\b\n  offload purge app images --yes")
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


@main.command(epilog="Examples:\n\n\b\n  offload dead app\n  offload dead app --replay 3kTMd9o0Zr9Zl2x7VvXbQA\n  offload dead app --replay all")
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
            _fail(f"no dead letter with id {replay_id!r}", EXIT_USAGE)
        click.echo(f"replayed {len(ids)} task(s)")
        return
    letters = app._portal.run(admin.dead_letters(app, limit))
    if not letters:
        click.echo("no dead letters")
    for d in letters:
        import datetime as dt

        when = dt.datetime.fromtimestamp(d.died_at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        click.echo(f"{d.id}  {when}  {d.queue:12} {d.reason}")


if __name__ == "__main__":
    main()
