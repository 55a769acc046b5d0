"""Capabilities kept out of the logs: browser tokens, passwords, bearer credentials.

A gateway URL carries a task's token in its query string (``?token=...``), and uvicorn's access
log writes every URL with its query. Whoever reads the logs could then read the tasks, so every
line `offload gateway` writes goes through `RedactCapabilities`, which rewrites
``token=<value>`` to ``token=[redacted]`` (and the same for passwords, secrets, ``Authorization``
values and the password of a URL) while the path and everything else stay readable.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

__all__ = ["REDACTED", "RedactCapabilities", "redact", "redact_logs"]

REDACTED = "[redacted]"

#: ``name=value`` pairs of a query string or a form whose value is a capability. The name may
#: end a longer one (``access_token``, ``metrics_token``, ``dashboard_password``).
_QUERY_VALUE = re.compile(
    r"(?i)((?:^|[?&;\s\"'(,])[a-z0-9_.-]*(?:token|password|passwd|secret|api[_-]?key|signature)=)[^&;\s\"')]*"
)
#: ``Authorization: Bearer abc`` (or ``'authorization': 'Basic abc'`` in a dumped header list).
_AUTHORIZATION = re.compile(r"(?i)(authorization[\"']?\s*[:=,]\s*(?:b?[\"'])?(?:(?:bearer|basic|token)\s+)?)[^\s\"',)]+")
#: The password of ``scheme://user:password@host``.
_URL_PASSWORD = re.compile(r"(://[^/\s:@]*:)[^@\s/]+@")

#: The loggers uvicorn writes its own lines to (records created there, whatever the handler).
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


def redact(text: str) -> str:
    """``text`` with the value of every capability it holds replaced by `REDACTED`."""
    text = _QUERY_VALUE.sub(rf"\1{REDACTED}", text)
    text = _AUTHORIZATION.sub(rf"\1{REDACTED}", text)
    return _URL_PASSWORD.sub(rf"\1{REDACTED}@", text)


class RedactCapabilities(logging.Filter):
    """Rewrites a record's arguments, message and traceback with `redact`; drops nothing.

    The arguments are redacted one by one first, because formatters such as uvicorn's access
    formatter read them back as a tuple. Only when the message as a whole still shows a
    capability (its name in the template, its value in an argument) is it replaced by its
    redacted text, without arguments.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: redact(v) if isinstance(v, str) else v for k, v in record.args.items()}
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a template that does not fit its arguments: leave it to logging
            message = None
        if message is not None and redact(message) != message:
            record.msg, record.args = redact(message), ()
        if record.exc_info and not record.exc_text:
            # Formatters reuse exc_text when it is set: the traceback is formatted once, here.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def redact_logs(extra_loggers: Iterable[str] = ()) -> None:
    """Put `RedactCapabilities` on uvicorn's loggers and on the handlers that write offload's
    lines (those of the root logger, where ``offload.*`` records end up, and uvicorn's).

    Call it once logging is configured (after ``uvicorn.Config``, which replaces uvicorn's
    handlers); calling it again adds nothing.
    """
    redacting = RedactCapabilities()
    names = (*UVICORN_LOGGERS, "offload", *extra_loggers)
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in names)]
    # A logger's filters see the records created on it; a handler's, also those propagated
    # from child loggers (offload.gateway, offload.worker, ...).
    for target in [*loggers, *(h for logger in loggers for h in logger.handlers)]:
        if not any(isinstance(f, RedactCapabilities) for f in target.filters):
            target.addFilter(redacting)
