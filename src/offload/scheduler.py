"""Periodic tasks: ``cron(...)``, ``every(...)``, ``@app.periodic(...)`` and the `Beat` that
enqueues them.

Every due run has an id: the schedule's name and its due time. Due times are computed from the
schedule alone (``every`` is aligned to the Unix epoch, ``cron`` to the clock in the app's
timezone), so all beats agree on them without talking to each other. Any number of beats may
run at once (one per worker with ``offload worker --beat``, or several ``offload beat``), and
each due run is enqueued exactly once:

* a run is *done* once a key named after it is in the store (`Store.set_if_absent`, with a TTL
  well beyond the schedule's period), and it is set only after the broker took the message;
* before enqueuing, a beat claims the run with a short lease holding its own id. The claimer
  enqueues; the others wait for the run to be done, and take over if the lease runs out first
  (its beat died midway). A claimer whose enqueue failed (the broker away) finds its own claim
  when it tries again, and sends again;
* every send of one run carries the same task id and the same broker deduplication key, so a
  send repeated after a failure that hid its success (or by a beat that took over) is one
  message.

The task id of a run is an HMAC of its id under a random key created once per namespace in the
store (set-if-absent, read by every beat): the same in every beat, and not computable by
someone who knows only the schedule's name and due time.

A beat that starts skips the runs that fell due while no beat was running, unless it (or the
periodic task) has ``catch_up=True``: then it enqueues every run due since the last one
enqueued, which the store remembers per schedule.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import logging
import math
import secrets
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from offload.errors import ConfigError
from offload.task import Options, Task

if TYPE_CHECKING:
    from offload.app import Offload

log = logging.getLogger("offload.beat")

#: A beat that catches up enqueues at most this many missed runs per schedule (the newest).
MAX_CATCH_UP = 1000
#: A run's claim outlives its due time by at least this, so a beat restarting or lagging
#: behind within this time cannot enqueue it again.
MIN_CLAIM_TTL_S = 3600.0
#: A beat that claimed a run and died before enqueuing it holds it this long; then another
#: beat takes it over.
RUN_LEASE_S = 30.0
#: How often a beat looks again at a run another beat claimed but has not enqueued yet.
PENDING_PAUSE_S = 0.25
#: The store key of the random key run task ids are derived from (one per namespace).
RUN_ID_KEY = "periodic:run-id-key"
_LOCK_TTL_S = 5.0
RETRY_PAUSE_S = 1.0


class Schedule(Protocol):
    def next_after(self, after: float, tz: dt.tzinfo) -> float:
        """The first due time (epoch seconds) strictly after ``after``."""
        ...


def zone_named(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"unknown timezone {name!r} (expected an IANA name such as 'UTC' or 'Europe/Paris')") from None


@dataclass(frozen=True, slots=True)
class Cron:
    """A standard 5-field cron expression, in the app's timezone unless one is given."""

    expr: str
    timezone: str | None = None

    def __post_init__(self) -> None:
        fields = self.expr.split()
        if not (len(fields) == 5 or (len(fields) == 1 and self.expr.strip().startswith("@"))) or not croniter.is_valid(self.expr):
            raise ConfigError(
                f"not a 5-field cron expression (minute hour day-of-month month day-of-week): {self.expr!r}"
            )
        if self.timezone is not None:
            zone_named(self.timezone)

    def next_after(self, after: float, tz: dt.tzinfo) -> float:
        zone = zone_named(self.timezone) if self.timezone else tz
        # croniter walks local wall-clock time with the zone's DST rules: "0 3 * * *" stays at
        # 03:00 local across a DST change.
        start = dt.datetime.fromtimestamp(after, zone)
        return float(croniter(self.expr, start).get_next(dt.datetime).timestamp())

    def __str__(self) -> str:
        return f"cron({self.expr!r})"


@dataclass(frozen=True, slots=True)
class Every:
    """A fixed interval, with due times at whole multiples of it since the Unix epoch (UTC)."""

    interval_s: float

    def next_after(self, after: float, tz: dt.tzinfo) -> float:
        return (math.floor(after / self.interval_s) + 1) * self.interval_s

    def __str__(self) -> str:
        return f"every({self.interval_s:g} s)"


def cron(expr: str, *, timezone: str | None = None) -> Cron:
    """``cron("0 3 * * *")``: at 03:00 every day in the app's timezone (UTC by default)."""
    return Cron(expr, timezone)


def every(interval: float | dt.timedelta | None = None, *, days: float = 0, hours: float = 0,
          minutes: float = 0, seconds: float = 0) -> Every:
    """``every(minutes=2)``: at every whole 2 minutes (00:00, 00:02, ... UTC)."""
    total = days * 86400 + hours * 3600 + minutes * 60 + seconds
    if isinstance(interval, dt.timedelta):
        total += interval.total_seconds()
    elif interval is not None:
        total += float(interval)
    if not total > 0:
        raise ConfigError("every() needs a positive interval, e.g. every(minutes=2)")
    return Every(total)


@dataclass(frozen=True, slots=True)
class Periodic:
    """One registered periodic task: what `Beat` enqueues, when, and with which options."""

    name: str  # the schedule's name; due runs are named after it
    task: str  # the task enqueued
    schedule: Cron | Every
    opts: Options
    catch_up: bool = False


def register(app: Offload, schedule: Cron | Every, *, name: str | None, catch_up: bool,
             options: dict[str, Any]) -> Callable[[Any], Task[Any, Any]]:
    """What ``@app.periodic(...)`` does: register the function as a task and its schedule."""
    if not isinstance(schedule, (Cron, Every)):
        raise ConfigError(f"@app.periodic needs a schedule: cron('0 3 * * *') or every(minutes=2), got {schedule!r}")

    def decorate(fn: Any) -> Task[Any, Any]:
        if isinstance(fn, Task):
            task, opts = fn, fn.opts.merge(**options)
        else:
            task = app.task(name=name, **options)(fn)
            opts = task.opts
        schedule_name = name or task.name
        if any(p.name == schedule_name for p in app.periodic_tasks):
            raise ConfigError(f"periodic task {schedule_name!r} is registered twice; give one of them name=...")
        app.periodic_tasks.append(Periodic(schedule_name, task.name, schedule, opts, catch_up))
        return task

    return decorate


async def run_id_key(app: Offload) -> bytes:
    """The random key run task ids are derived from: created by the first beat of the
    namespace (set-if-absent, so concurrent first beats agree), read by every other."""
    store = await app._store()
    await store.set_if_absent(RUN_ID_KEY, secrets.token_urlsafe(32).encode())
    key = await store.get_value(RUN_ID_KEY)
    if key is None:  # removed between the two calls (a flushed namespace)
        raise ConfigError(f"the store lost {RUN_ID_KEY!r} while it was being read; start the beat again")
    return key


def run_task_id(key: bytes, name: str, due_ms: int) -> str:
    """The task id of one due run under the namespace's `run_id_key`: the same in every beat,
    and as hard to guess as a random id without the key."""
    digest = hmac.new(key, f"{name}\0{due_ms}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:16]).decode().rstrip("=")


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds")


class Beat:
    """Enqueues the app's periodic tasks when due. ``run()`` does the side effects; several
    beats may run at once (see the module docstring)."""

    def __init__(self, app: Offload, catch_up: bool = False) -> None:
        self.app = app
        self.catch_up = catch_up
        self.id = secrets.token_hex(6)
        self.enqueued = 0
        self._run_id_key: bytes | None = None
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def stop(self) -> None:
        """Stop running (callable from any thread)."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    async def run(self, handle_signals: bool = False) -> None:
        """Enqueue due runs until stopped (SIGTERM/SIGINT with ``handle_signals``, or `stop()`)."""
        self._stop = asyncio.Event()
        self._loop = loop = asyncio.get_running_loop()
        periodic = list(self.app.periodic_tasks)
        if not periodic:
            log.warning("beat: the app has no periodic tasks (register some with @app.periodic)")
            return
        tz = zone_named(self.app.timezone)
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop.set)
        try:
            now = time.time()
            due: dict[str, float] = {}
            for p in periodic:
                if self.catch_up or p.catch_up:
                    await self._catch_up(p, tz, now)
                due[p.name] = p.schedule.next_after(now, tz)
            log.info("beat ready: %d periodic task(s), timezone %s, catch-up %s", len(periodic), self.app.timezone,
                     "on" if self.catch_up else "only for catch_up=True tasks")
            for p in periodic:
                log.info("  %s: %s, next at %s", p.name, p.schedule, _iso(due[p.name]))
            while not self._stop.is_set():
                now = time.time()
                left = RETRY_PAUSE_S
                try:
                    pending = False
                    for p in periodic:
                        if due[p.name] <= now:
                            if await self._enqueue(p, due[p.name], tz):
                                due[p.name] = p.schedule.next_after(due[p.name], tz)
                            else:
                                pending = True
                    left = PENDING_PAUSE_S if pending else min(due.values()) - time.time()
                except Exception as e:  # the store or broker is away: keep the run due, try again
                    log.warning("beat: enqueuing failed (%s); retrying in %.0f s", e, RETRY_PAUSE_S)
                # Sleep until the next due time (or a stop); the wall clock is re-read on waking.
                if left > 0:
                    try:
                        await asyncio.wait_for(self._stop.wait(), left)
                    except TimeoutError:
                        pass
        finally:
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
            log.info("beat stopped after enqueuing %d run(s)", self.enqueued)

    def _claim_ttl(self, p: Periodic, tz: dt.tzinfo) -> float:
        first = p.schedule.next_after(time.time(), tz)
        return max(4 * (p.schedule.next_after(first, tz) - first), MIN_CLAIM_TTL_S)

    async def _catch_up(self, p: Periodic, tz: dt.tzinfo, now: float) -> None:
        last = await self._last(p)
        if last is None:
            log.info("%s: no run enqueued before; nothing to catch up", p.name)
            return
        missed: list[float] = []
        start = last / 1000
        if isinstance(p.schedule, Every):  # jump over what would be dropped anyway
            start = max(start, now - (MAX_CATCH_UP + 1) * p.schedule.interval_s)
        t = p.schedule.next_after(start, tz)
        while t <= now:
            missed.append(t)
            if len(missed) > MAX_CATCH_UP:
                missed.pop(0)
            t = p.schedule.next_after(t, tz)
        if missed:
            log.info("%s: catching up %d missed run(s) since %s", p.name, len(missed), _iso(last / 1000))
        for t in missed:
            while not await self._enqueue(p, t, tz):
                await asyncio.sleep(PENDING_PAUSE_S)

    async def _enqueue(self, p: Periodic, due: float, tz: dt.tzinfo) -> bool:
        """Enqueue one due run unless it is done (see the module docstring). True once the run
        is done, by this beat or another; False while another beat holds its claim. Raises if
        the store or broker fails: the run is then still due, and claimed by this beat."""
        store = await self.app._store()
        due_ms = round(due * 1000)
        run_id = f"{p.name}@{_iso(due)}"
        done_key = f"periodic:{p.name}:run:{due_ms}"
        if await store.get_value(done_key) is not None:
            log.debug("%s already enqueued by another beat", run_id)
            return True
        claim_key = f"periodic:{p.name}:claim:{due_ms}"
        owner = self.id.encode()
        if not await store.set_if_absent(claim_key, owner, RUN_LEASE_S) and await store.get_value(claim_key) != owner:
            # Claimed by another beat: done in a moment, or free again if that beat died.
            return await store.get_value(done_key) is not None
        if self._run_id_key is None:
            self._run_id_key = await run_id_key(self.app)
        opts = p.opts.merge(key=f"periodic:{run_id}", headers={"periodic": p.name, "due": _iso(due)})
        env = self.app.build(p.task, (), {}, opts, task_id=run_task_id(self._run_id_key, p.name, due_ms))
        await self.app.enqueue_envelope(env)
        # Done only now that the broker has the message: a failure above leaves the run to
        # this beat's next try (its own claim), or to another beat when the lease runs out.
        if await store.set_if_absent(done_key, owner, self._claim_ttl(p, tz)):
            self.enqueued += 1
            log.info("enqueued %s (due %s) as %s", p.name, _iso(due), env.id)
        await self._remember(p, due_ms)
        return True

    # -- the last enqueued due time per schedule, for catching up ------------------------------
    async def _last(self, p: Periodic) -> int | None:
        raw = await (await self.app._store()).get_value(f"periodic:{p.name}:last")
        return None if raw is None else int(raw)

    async def _remember(self, p: Periodic, due_ms: int) -> None:
        # The store has no compare-and-set, so raising the value to a maximum takes a short lock
        # (two beats may enqueue different runs of one schedule at once while catching up).
        store = await self.app._store()
        lock, key = f"periodic:{p.name}:last:lock", f"periodic:{p.name}:last"
        for _ in range(100):
            if await store.set_if_absent(lock, self.id.encode(), _LOCK_TTL_S):
                break
            await asyncio.sleep(0.01)
        else:
            log.warning("%s: could not record the last run (lock busy); catch-up may start earlier", p.name)
            return
        try:
            last = await self._last(p)
            if last is None or last < due_ms:
                await store.delete_value(key)
                await store.set_if_absent(key, str(due_ms).encode())
        finally:
            await store.delete_value(lock)
