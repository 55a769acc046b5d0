"""The long-running commands: ``offload worker``, ``offload beat``, ``offload gateway``."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

import click

from offload import loops
from offload.cli.common import LOG_FORMAT_OPTION, LOG_LEVEL_OPTION, LOOP_OPTION, setup_logging, user_errors
from offload.loading import load_app


@click.command(epilog="Examples:\n\n\b\n  offload worker photos.tasks:app\n  offload worker photos.tasks -q images,default -c 4 --pool process")
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
@click.option("--metrics-port", type=click.IntRange(0, 65535), metavar="PORT",
              help="Serve this worker's Prometheus metrics (task durations and outcomes by name) on PORT.")
@click.option("--metrics-host", default="127.0.0.1", show_default=True, help="The address of --metrics-port.")
@click.option("--beat", "with_beat", is_flag=True, help="Also run the periodic scheduler in this worker (small sites).")
@LOG_LEVEL_OPTION
@LOG_FORMAT_OPTION
@LOOP_OPTION
@user_errors
def worker(app_spec: str, queues: str, concurrency: int | None, pool: str, prefetch: int | None, burst: bool,
           connect_timeout: float | None, grace: float, max_tasks_per_child: int | None, metrics_port: int | None,
           metrics_host: str, with_beat: bool, log_level: str,
           log_format: str, loop: str | None) -> None:
    """Run a worker: lease tasks from QUEUES and run them.

    A broker that cannot be reached at start-up is retried with backoff (0.5 s doubling to
    about 10 s), with a warning each time, until it answers; SIGTERM or SIGINT meanwhile exits 0."""
    from offload.worker import Worker

    setup_logging(log_level, log_format)
    app = load_app(app_spec)
    w = Worker(
        app, queues=[q for q in queues.split(",") if q], concurrency=concurrency, pool=pool,  # type: ignore[arg-type]
        prefetch=prefetch, burst=burst, grace_s=grace, max_tasks_per_child=max_tasks_per_child,
        connect_timeout_s=connect_timeout, metrics_port=metrics_port, metrics_host=metrics_host,
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


@click.command(epilog="Example:\n\n\b\n  offload beat photos.tasks:app")
@click.argument("app_spec", metavar="APP")
@click.option("--catch-up", is_flag=True, help="Enqueue runs missed while no beat was running (default: skip them).")
@LOG_LEVEL_OPTION
@LOG_FORMAT_OPTION
@LOOP_OPTION
@user_errors
def beat(app_spec: str, catch_up: bool, log_level: str, log_format: str, loop: str | None) -> None:
    """Run the periodic scheduler. Several may run at once; each due run is enqueued once."""
    from offload.scheduler import Beat

    setup_logging(log_level, log_format)
    app = load_app(app_spec)
    try:
        loops.run(Beat(app, catch_up=catch_up).run(handle_signals=True), loop)
    except KeyboardInterrupt:
        pass


@click.command(epilog="Examples:\n\n\b\n  offload gateway photos.tasks:app --port 8001\n"
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
@click.option("--dashboard", is_flag=True,
              help="Serve /dashboard/, behind basic auth (user admin) with the password in $OFFLOAD_DASHBOARD_PASSWORD; "
                   "without one, on a loopback --host only.")
@LOG_LEVEL_OPTION
@user_errors
def gateway(app_spec: str, host: str, port: int, cors_origins: tuple[str, ...], grace: float, access_log: bool,
            metrics: bool | None, metrics_token: str | None, dashboard: bool, log_level: str) -> None:
    """Serve the browser gateway (long polling, SSE, offload.js, metrics) with uvicorn."""
    from offload.gateway.serve import serve

    setup_logging(log_level)
    serve(load_app(app_spec), host=host, port=port, cors_origins=cors_origins, grace_s=grace, access_log=access_log,
          log_level=log_level, metrics=metrics, metrics_token=metrics_token or None, dashboard=dashboard,
          # From the environment only: a command line is visible to every user of the machine.
          dashboard_password=os.environ.get("OFFLOAD_DASHBOARD_PASSWORD") or None)
