"""What a task state carries into a store (`StateRow`, with its `Listing` in the history) and
what a store's history is asked (`HistoryQuery`). A store never decodes a state's bytes: the
listing given beside them is all it indexes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["HistoryQuery", "Listing", "StateRow", "state_rows"]


@dataclass(frozen=True, slots=True)
class Listing:
    """What the history (`Store.history`) files a task state under. A store never decodes the
    state's bytes, so whoever encodes a state gives these beside it."""

    status: str
    name: str
    queue: str
    queued_at: float  # epoch seconds: the history's order, newest first


class StateRow(NamedTuple):
    """A task state on its way into a store: its id, its encoded bytes, and what the history
    files it under (None: kept, read by id, but not listed). A plain (id, data) pair is read
    as a row without a listing."""

    id: str
    data: bytes
    listing: Listing | None = None


def state_rows(states: Sequence[StateRow]) -> list[StateRow]:
    """The rows as `StateRow`s, a plain (id, data) pair becoming one without a listing."""
    return [s if len(s) == 3 else StateRow(*s) for s in states]


@dataclass(frozen=True, slots=True)
class HistoryQuery:
    """Which states `Store.history` lists: those whose listing matches every filter given,
    queued before ``before`` (epoch seconds) when given, newest first, ``limit`` at most."""

    status: str | None = None
    name: str | None = None
    queue: str | None = None
    limit: int = 100
    before: float | None = None

    def matches(self, listing: Listing) -> bool:
        return ((self.status is None or listing.status == self.status)
                and (self.name is None or listing.name == self.name)
                and (self.queue is None or listing.queue == self.queue)
                and (self.before is None or listing.queued_at < self.before))
