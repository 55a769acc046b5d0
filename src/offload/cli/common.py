"""What every ``offload`` command shares: exit codes, one-line errors, logging, options."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, NoReturn, TypeVar

import click

from offload import loops
from offload.errors import BrokerUnavailable, OffloadError, TaskFailed
from offload.logs import JsonFormatter

# Exit codes (sysexits.h where one fits).
EXIT_OK = 0
EXIT_TASK_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69
EXIT_SOFTWARE = 70

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"offload: error: {message}", err=True)
    sys.exit(code)


def user_errors(fn: F) -> F:
    """Turn the errors a user can cause into one line and an exit code."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BrokerUnavailable as e:
            fail(str(e), EXIT_UNAVAILABLE)
        except TaskFailed as e:
            fail(f"task failed: {e}", EXIT_TASK_FAILED)
        except LookupError as e:  # KeyError's str() adds quotes; show the message itself
            fail(str(e.args[0]) if e.args else str(e), EXIT_USAGE)
        except OffloadError as e:
            fail(str(e), EXIT_USAGE)
        except ImportError as e:
            fail(f"cannot load the app: {e}", EXIT_USAGE)

    return wrapper  # type: ignore[return-value]


def setup_logging(level: str, log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])


LOOP_OPTION = click.option(
    "--loop", type=click.Choice(loops.LOOP_NAMES), default=None,
    help=f"Event loop: uvloop when installed (auto), or asyncio's own. [default: ${loops.LOOP_ENV}, else auto]",
)
LOG_LEVEL_OPTION = click.option("--log-level", default="info", show_default=True,
                                type=click.Choice(["debug", "info", "warning", "error"]))
LOG_FORMAT_OPTION = click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
                                 help="json: one JSON object a line (ts, level, event, task_id, name, queue, attempt, "
                                      "duration_ms, worker), for a log shipper.")

APP_HELP = ("APP is module:attribute (or a module holding `app`), e.g. myproject.tasks:app, or "
            "module:function() to build the app by calling a function, e.g. myproject.tasks:create_app().")


def json_arg(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"{what} is not valid JSON: {e}") from None


def stderr_console() -> Any:
    from rich.console import Console  # rich loads slowly; only commands that draw need it

    return Console(stderr=True)
