"""Rate limits (``@app.task(rate_limit="10/s")``) that hold across every worker on a broker.

The limit is checked by an admission hook (`Offload.admission_hooks`) before a task starts; a
task over the limit is put back with a delay and waits, costing no attempt.

The count is a sliding window kept in the store with `Store.incr` alone: time is cut into
buckets of a tenth of the window, one counter per task name and bucket (expiring by itself).
A task first adds itself to the current bucket, then sums the buckets that can hold a start
within the last window; over the limit, it takes itself out again and waits until enough of
the oldest buckets have left the window. Adding before summing is what makes it safe across
workers: of any starts that overlap, the last one to add sees all the others, so none can
push a window over the limit (two racing for the last place may both back off; that only
costs a little throughput). That needs the whole check to happen within the bucket it counts
in, so a check that a busy machine held up past its bucket's end is undone and retried. The
sum covers two buckets more than the window, so the promise
holds for any window of the stated length, wherever it starts, with a bucket to spare for the
time between admission and the task's first line.
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from offload.errors import ConfigError
from offload.message import Envelope

if TYPE_CHECKING:
    from offload.app import Offload
    from offload.task import Task

BUCKETS_PER_WINDOW = 10
_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0, "h": 3600.0, "hour": 3600.0}
_FORMAT = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*([a-z]+?)s?\s*$")


@dataclass(frozen=True, slots=True)
class RateLimit:
    limit: int
    window_s: float

    @property
    def bucket_s(self) -> float:
        return self.window_s / BUCKETS_PER_WINDOW


@lru_cache(maxsize=256)
def parse_rate(text: str) -> RateLimit:
    """``"10/s"``, ``"100/m"``, ``"1000/h"`` (also ``"5/10s"``, ``"30/minute"``)."""
    match = _FORMAT.match(text.lower()) if isinstance(text, str) else None
    unit = match and _UNITS.get(match.group(3))
    if match is None or unit is None or int(match.group(1)) < 1 or match.group(2) == "0":
        raise ConfigError(
            f"rate_limit must look like '10/s', '100/m' or '1000/h' (a count of at least 1 per second, "
            f"minute or hour), got {text!r}"
        )
    return RateLimit(int(match.group(1)), int(match.group(2) or 1) * unit)


def install(app: Offload) -> None:
    """Hang the limiter on the app, once (called when a task with a rate_limit is registered)."""
    if not any(isinstance(h, Limiter) for h in app.admission_hooks):
        app.admission_hooks.append(Limiter(app))


class Limiter:
    """The admission hook: None to start the task now, or the seconds to wait first."""

    def __init__(self, app: Offload) -> None:
        self.app = app

    async def __call__(self, env: Envelope, task: Task[Any, Any]) -> float | None:
        if not task.opts.rate_limit:
            return None
        rate = parse_rate(task.opts.rate_limit)
        store = await self.app._store()
        now = time.time()
        bucket = math.floor(now / rate.bucket_s)
        span = BUCKETS_PER_WINDOW + 2  # buckets summed: the current one and those before it
        ttl = (span + 1) * rate.bucket_s

        def key(b: int) -> str:
            return f"rate:{task.name}:{b}"

        mine = await store.incr(key(bucket), 1, ttl)
        counts = [mine - 1]  # newest first, without this task
        total = mine
        for b in range(bucket - 1, bucket - span, -1):
            if total > rate.limit:
                break
            n = await store.incr(key(b), 0, ttl)  # incr by 0: a portable read of a counter
            counts.append(n)
            total += n
        if total <= rate.limit and math.floor(time.time() / rate.bucket_s) == bucket:
            return None
        # Over the limit, or this process was held up long enough for the bucket to pass: a
        # start counted in a bucket others have already summed could go unseen, so take it
        # back and try again.
        await store.incr(key(bucket), -1, ttl)
        if total <= rate.limit:
            return random.uniform(0.01, max(rate.bucket_s / 2, 0.01))
        return _wait_s(rate, bucket, counts[::-1], span, now)


def _wait_s(rate: RateLimit, bucket: int, counts: list[int], span: int, now: float) -> float:
    """How long until this task fits: until enough of the oldest buckets have left the window.
    ``counts`` are oldest first, ending with the current bucket (not all of them may have been
    read when the newest were enough to say no; the unread ones count as full)."""
    counts = [rate.limit] * (span - len(counts)) + counts
    dropped = 0
    while sum(counts[dropped:]) >= rate.limit and dropped < span:
        dropped += 1
    opens_at = (bucket + dropped) * rate.bucket_s
    # Waiters for the same opening are spread over half a bucket so they do not all knock at once.
    return max(opens_at - now, 0.0) + random.uniform(0.01, max(rate.bucket_s / 2, 0.01))
