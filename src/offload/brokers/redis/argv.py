"""What goes into the scripts (their ARGV, built from the protocol's types) and what their
replies mean. The shape of each is the one its ``lua/*.lua`` file states in its header.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from offload.brokers.base import DeadLetter, Delivery, OutgoingMessage, ttl_ms
from offload.brokers.states import HistoryQuery, Listing, StateRow, state_rows

__all__ = [
    "DONE_SIGNAL_MS",
    "ack_args",
    "claimed",
    "dead_letters",
    "enqueue_args",
    "history_args",
    "listing",
    "put_states_args",
    "receipt",
    "settle_args",
    "text",
]

# How long a final state stays in done:<id> for blocked sync waiters (see Direct.wait_final).
DONE_SIGNAL_MS = 120_000


def text(value: bytes) -> str:
    return value.decode()


def enqueue_args(message: OutgoingMessage) -> list[str | bytes | int]:
    """ARGV of enqueue.lua."""
    priority = min(max(int(message.priority), 0), 9)
    return [
        message.id, message.queue, message.body, priority,
        "" if message.eta is None else repr(float(message.eta)),
        "0" if message.key is None else "1", message.key or "",
        message.state or b"", ttl_ms(message.state_ttl_s) or 0, listing(message.state_listing),
    ]  # fmt: skip


def listing(entry: Listing | None) -> str:
    """A listing as lib_history.lua reads it: 'status\\x1fqueued_at\\x1fqueue\\x1fname', '' for none."""
    if entry is None:
        return ""
    return "\x1f".join((entry.status, repr(float(entry.queued_at)), entry.queue, entry.name))


def history_args(query: HistoryQuery) -> list[str | bytes | int]:
    """ARGV of history.lua."""
    before = "" if query.before is None else repr(float(query.before))
    return [query.status or "", query.name or "", query.queue or "", query.limit, before]


def put_states_args(
    states: Sequence[StateRow], ttl_s: float | None, final: Collection[str]
) -> list[str | bytes | int]:
    """ARGV of put_states.lua."""
    ttl = ttl_ms(ttl_s) or 0
    args: list[str | bytes | int] = [ttl, min(ttl or DONE_SIGNAL_MS, DONE_SIGNAL_MS)]
    for row in state_rows(states):
        args += [row.id, row.data, "1" if row.id in final else "0", listing(row.listing)]
    return args


def ack_args(deliveries: Sequence[Delivery]) -> list[str | bytes | int]:
    """ARGV of ack.lua: (id, receipt) pairs, so that only the current lease holder acknowledges."""
    return [v for d in deliveries for v in (d.id, receipt(d))]


def settle_args(
    states: Sequence[StateRow], ttl_s: float | None, final: Collection[str], deliveries: Sequence[Delivery]
) -> list[str | bytes | int]:
    """ARGV of settle.lua: the states, then the messages to acknowledge (the claim, if any,
    is the caller's to add)."""
    ttl, done_ttl, *quadruples = put_states_args(states, ttl_s, final)
    return [ttl, done_ttl, len(states), *quadruples, len(deliveries), *ack_args(deliveries)]


def receipt(delivery: Delivery) -> str:
    """The lease's receipt as the scripts take it: '' for a delivery that has none."""
    return "" if delivery.receipt is None else str(delivery.receipt)


def claimed(reply: list[Any]) -> tuple[list[Delivery], float | None]:
    """A claim's reply: the leased deliveries, or none and when something may become ready."""
    if reply[0] == b"0":
        return [], float(reply[1]) if reply[1] else None
    return [
        Delivery(id=text(reply[i]), queue=text(reply[i + 1]), body=reply[i + 2], deliveries=int(reply[i + 3]), receipt=text(reply[i + 3]))
        for i in range(1, len(reply), 4)
    ], None


def dead_letters(reply: list[bytes]) -> list[DeadLetter]:
    """The reply of dead_list.lua or replay.lua."""
    return [
        DeadLetter(
            id=text(reply[i]),
            queue=text(reply[i + 1]),
            body=reply[i + 2],
            reason=text(reply[i + 3]),
            died_at=float(reply[i + 4]),
        )
        for i in range(0, len(reply), 5)
    ]
