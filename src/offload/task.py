"""Tasks, references by name, per-call options and signatures."""

from __future__ import annotations

import datetime as dt
import inspect
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, Protocol, TypeVar, overload

from offload.errors import ConfigError

if TYPE_CHECKING:
    from offload.app import Offload
    from offload.result import Result

P = ParamSpec("P")
R = TypeVar("R")

#: Options accepted by @app.task(...) and by .options(...).
TASK_OPTIONS = frozenset(
    {"queue", "priority", "retries", "retry_backoff", "time_limit", "soft_time_limit", "expires", "rate_limit"}
)
CALL_OPTIONS = TASK_OPTIONS - {"rate_limit"} | {"countdown", "eta", "key", "headers"}


def _seconds(name: str, value: float | dt.timedelta | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, dt.timedelta):
        value = value.total_seconds()
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{name} must be a number of seconds >= 0 or a timedelta, got {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class Options:
    """Resolved options for one enqueue. Durations are seconds; eta/expires are epoch seconds."""

    queue: str = "default"
    priority: int = 0
    retries: int = 0
    retry_backoff_s: float = 1.0
    time_limit_s: float | None = None
    soft_time_limit_s: float | None = None
    expires: float | dt.datetime | dt.timedelta | None = None  # relative or absolute, resolved at send
    rate_limit: str | None = None
    countdown_s: float | None = None
    eta: dt.datetime | None = None
    key: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    #: Options set explicitly (by the decorator or a call), as opposed to library defaults. A
    #: sender that knows a task only by name sends just these; the worker fills in the rest from
    #: the task's own decorator.
    given: frozenset[str] = frozenset()

    def merge(self, **opts: Any) -> Options:
        unknown = set(opts) - CALL_OPTIONS - TASK_OPTIONS
        if unknown:
            raise ConfigError(f"unknown task option(s): {', '.join(sorted(unknown))}; known: {', '.join(sorted(CALL_OPTIONS | TASK_OPTIONS))}")
        changes: dict[str, Any] = {}
        for name, value in opts.items():
            if name == "priority":
                if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 9:
                    raise ConfigError(f"priority must be an int from 0 to 9 (higher runs first), got {value!r}")
                changes["priority"] = value
            elif name == "queue":
                if not isinstance(value, str) or not value or any(c in value for c in ",: \t\n"):
                    raise ConfigError(f"queue must be a non-empty name without ',', ':' or spaces, got {value!r}")
                changes["queue"] = value
            elif name == "retries":
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise ConfigError(f"retries must be an int >= 0, got {value!r}")
                changes["retries"] = value
            elif name in ("retry_backoff", "time_limit", "soft_time_limit", "countdown"):
                changes[f"{name}_s"] = _seconds(name, value)
            elif name == "eta":
                if value is not None and (not isinstance(value, dt.datetime) or value.tzinfo is None):
                    raise ConfigError(f"eta must be an aware datetime (with a tzinfo), got {value!r}")
                changes["eta"] = value
            elif name == "expires":
                if isinstance(value, dt.datetime) and value.tzinfo is None:
                    raise ConfigError("expires must be seconds, a timedelta or an aware datetime (with a tzinfo)")
                if not isinstance(value, dt.datetime):
                    _seconds("expires", value)
                changes["expires"] = value
            elif name == "key":
                if value is not None and not isinstance(value, str):
                    raise ConfigError(f"key must be a string, got {value!r}")
                changes["key"] = value
            elif name == "headers":
                changes["headers"] = {**self.headers, **(value or {})}
            else:
                changes[name] = value
        merged = replace(self, **changes, given=self.given | set(opts))
        if merged.countdown_s is not None and merged.eta is not None:
            raise ConfigError("give countdown or eta, not both")
        if (
            merged.soft_time_limit_s is not None
            and merged.time_limit_s is not None
            and merged.soft_time_limit_s > merged.time_limit_s
        ):
            raise ConfigError("soft_time_limit must not be longer than time_limit")
        return merged


class _Sends:
    """What tasks, references by name and option-bound calls share: delay, adelay, s."""

    app: Offload
    name: str
    opts: Options

    def options(self, **opts: Any) -> Call:
        return Call(self.app, self.name, self.opts.merge(**opts))

    def delay(self, *args: Any, **kwargs: Any) -> Result[Any]:
        return self.app.sending.send_sync(self.name, args, kwargs, self.opts)

    async def adelay(self, *args: Any, **kwargs: Any) -> Result[Any]:
        return await self.app.sending.enqueue(self.name, args, kwargs, self.opts)

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """A signature: this call, not yet sent (for group, chain, chord and race)."""
        return Signature(self.app, self.name, args, kwargs, self.opts)


class Call(_Sends):
    """A task name with per-call options bound: ``task.options(priority=9).delay(...)``."""

    def __init__(self, app: Offload, name: str, opts: Options) -> None:
        self.app, self.name, self.opts = app, name, opts

    def __repr__(self) -> str:
        return f"<Call {self.name} {self.opts}>"


class TaskRef(Call):
    """`app.ref(name)`: a task known only by name, for code that does not import the task."""


class Task(_Sends, Generic[P, R]):
    """A function registered with ``@app.task``. Calling it runs it inline. ``R`` is what its
    results hold: the function's return value (for ``async def``, the awaited one: see AsyncTask)."""

    fn: Callable[P, Any]

    def __init__(self, app: Offload, fn: Callable[P, Any], name: str, opts: Options) -> None:
        self.app, self.fn, self.name, self.opts = app, fn, name, opts
        self.is_async = inspect.iscoroutinefunction(fn)
        self.__doc__ = fn.__doc__
        self.__name__ = getattr(fn, "__name__", name)
        self.__wrapped__ = fn

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return f"<Task {self.name}>"

    if TYPE_CHECKING:  # precise types for editors: delay() takes the task's parameters

        def delay(self, *args: P.args, **kwargs: P.kwargs) -> Result[R]: ...
        async def adelay(self, *args: P.args, **kwargs: P.kwargs) -> Result[R]: ...


class AsyncTask(Task[P, R]):
    """An ``async def`` registered with ``@app.task``: its results hold what the coroutine
    returns, and calling it inline gives the coroutine to await."""

    # Not an R: the coroutine that gives one. Holding an AsyncTask as a Task[P, R] and calling
    # it is the one thing the types then get wrong.
    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]:  # type: ignore[override]
        return self.fn(*args, **kwargs)  # type: ignore[no-any-return]


class TaskDecorator(Protocol):
    """What ``@app.task(queue=...)`` returns: a decorator keeping the function's types."""

    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> AsyncTask[P, R]: ...
    @overload
    def __call__(self, fn: Callable[P, R], /) -> Task[P, R]: ...


@dataclass(slots=True)
class Signature:
    """A task call not yet sent: name, arguments and options."""

    app: Offload
    name: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    opts: Options = field(default_factory=Options)

    def options(self, **opts: Any) -> Signature:
        return replace(self, opts=self.opts.merge(**opts))

    def delay(self) -> Result[Any]:
        return self.app.sending.send_sync(self.name, self.args, self.kwargs, self.opts)

    async def adelay(self) -> Result[Any]:
        return await self.app.sending.enqueue(self.name, self.args, self.kwargs, self.opts)

    def with_first_arg(self, value: Any) -> Signature:
        return replace(self, args=(value, *self.args))

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the serializer: the call and the options given for it. ``countdown``
        and a relative ``expires`` stay relative: they count from when the call is sent (a
        workflow member is sent when its turn comes)."""
        o = self.opts
        expires = o.expires.total_seconds() if isinstance(o.expires, dt.timedelta) else o.expires
        options = {
            "queue": o.queue, "priority": o.priority, "retries": o.retries, "retry_backoff": o.retry_backoff_s,
            "time_limit": o.time_limit_s, "soft_time_limit": o.soft_time_limit_s, "countdown": o.countdown_s,
            "eta": o.eta, "expires": expires, "key": o.key, "headers": o.headers,
        }
        # Only what was set explicitly: library defaults would override, in the process that
        # sends the call, the options of a task it knows only by name.
        return {
            "name": self.name, "args": list(self.args), "kwargs": self.kwargs,
            "options": {k: v for k, v in options.items() if k in o.given},
        }

    @classmethod
    def from_dict(cls, app: Offload, data: dict[str, Any]) -> Signature:
        return cls(app, data["name"], tuple(data.get("args", ())), data.get("kwargs", {}),
                   app._default_options(data["name"]).merge(**data.get("options", {})))


def task_name(fn: Callable[..., Any]) -> str:
    """``module.function`` (``module.Class.method`` for a method): the name under which a
    worker that imports the module finds the task.

    A function defined in a script run as ``python tasks.py`` (or ``python -m tasks``) lives in
    ``__main__``, but a worker imports it as ``tasks``: it is named after that module. A
    function defined inside another function, or a lambda, has no name a worker could import
    it by, so it needs ``name=``.
    """
    qualname = getattr(fn, "__qualname__", None)
    module = getattr(fn, "__module__", None) or "__main__"
    if not isinstance(qualname, str):
        raise ConfigError(f"{fn!r} has no __qualname__ to name the task by; give it name='...'")
    if "<locals>" in qualname or "<lambda>" in qualname:
        what = "a lambda" if qualname.endswith("<lambda>") else "defined inside a function"
        raise ConfigError(
            f"task {module}.{qualname} is {what}, so a worker can never import it by name: define it at "
            "the top level of a module, or give it name='...' (and register it where workers import it)"
        )
    if module == "__main__":
        module = main_module_name()
    return f"{module}.{qualname}"


def main_module_name() -> str:
    """The name a worker imports the ``__main__`` module by: its ``-m`` name, or its file's
    name with the packages (directories holding ``__init__.py``) around it. ``__main__`` when
    it has no file (an interactive session, ``python -c``)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name and spec.name != "__main__":
        return str(spec.name)
    file = getattr(main, "__file__", None)
    if not file:
        return "__main__"
    path = Path(file).resolve()
    parts = [path.stem]
    folder = path.parent
    while (folder / "__init__.py").exists() and folder.parent != folder:
        parts.insert(0, folder.name)
        folder = folder.parent
    return ".".join(parts)
