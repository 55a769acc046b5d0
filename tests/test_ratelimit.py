"""Rate limits: parsing at decoration time, and a limit held across two worker processes on
every broker (memory://: two worker threads)."""

from __future__ import annotations

import pytest

from offload import ConfigError, Offload
from offload.ratelimit import RateLimit, parse_rate
from tests import flows_harness
from tests.flows_harness import Harness

harness = flows_harness.harness


@pytest.mark.parametrize(
    ("text", "expected"),
    [("10/s", RateLimit(10, 1)), ("100/m", RateLimit(100, 60)), ("1000/h", RateLimit(1000, 3600)),
     ("5/10s", RateLimit(5, 10)), ("30/minute", RateLimit(30, 60)), (" 2 / hours ", RateLimit(2, 3600))],
)
def test_rates_parse(text: str, expected: RateLimit) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize("text", ["10", "ten/s", "0/s", "10/d", "10/0s", "-1/s", "10/s/s", ""])
def test_a_bad_rate_fails_at_decoration_time(text: str) -> None:
    app = Offload("memory://ratelimit-parse")
    with pytest.raises(ConfigError, match="rate_limit"):

        @app.task(name="limited", rate_limit=text)
        def limited() -> None: ...

    assert app.registry == {} and app.admission_hooks == []


def test_the_limiter_is_hung_on_the_app_once_and_only_when_needed() -> None:
    app = Offload("memory://ratelimit-hook")

    @app.task(name="free")
    def free() -> None: ...

    assert app.admission_hooks == []

    @app.task(name="one", rate_limit="1/s")
    def one() -> None: ...

    @app.task(name="two", rate_limit="2/s")
    def two() -> None: ...

    assert len(app.admission_hooks) == 1


def test_two_workers_never_exceed_the_limit_together(harness: Harness) -> None:
    h = harness
    h.workers(2, "-c", "8")
    path = h.dir / "starts"
    # Given 20 tasks limited to 5 per second, sent at once to two workers,
    results = [h.app.ref("tests.apps.flows.limited").delay(str(path), f"t{i}") for i in range(20)]
    # then all of them run (waiting, not failing, and costing no attempt) ...
    assert sorted(r.get(timeout=30) for r in results) == sorted(f"t{i}" for i in range(20))
    assert {r.state().attempts for r in results} == {1}
    starts = sorted(float(line.split()[0]) for line in path.read_text().splitlines())
    assert len(starts) == 20
    # ... and no one-second window, wherever it starts, holds more than 5 of their starts.
    crowded = [(a, b) for a, b in zip(starts, starts[5:], strict=False) if b - a < 1.0]
    assert not crowded, crowded
    # The limit is not met by crawling either: 20 at 5/s take about 4 s.
    assert starts[-1] - starts[0] < 8.0, starts
