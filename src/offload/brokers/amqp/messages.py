"""What an offload message carries on RabbitMQ: its headers, priority and persistence, and the
readers of the values that come back in a delivery's headers."""

from __future__ import annotations

import asyncio
from typing import Any

import aiormq
from aio_pika.abc import AbstractIncomingMessage

from offload.brokers.amqp.received import Received

MAX_PRIORITY = 10
PERSISTENT = 2  # delivery_mode: written to disk, confirmed once written
DUE_SLACK_S = 0.002  # closer than this to its eta, a message is due

# Message headers. Not "x-" prefixed: headers exchanges ignore x- headers when matching.
H_ID = "offload-id"
H_QUEUE = "offload-queue"
H_COPY = "offload-copy"  # unique per publish: tells a redelivered copy from a republished one
H_DELIVERIES = "offload-deliveries"  # hand-outs before this copy was published
H_ETA = "offload-eta"
H_EXPIRES = "offload-expires"
H_KEY = "offload-key"
H_DELAY = "offload-delay-ms"
H_REASON = "offload-reason"
H_DIED_AT = "offload-died-at"

#: A delivery: a consumer's (`Received`) or basic.get's (aio-pika's message).
Incoming = AbstractIncomingMessage | Received
#: What a publish sends: the body and its AMQP properties.
Outgoing = tuple[bytes, aiormq.spec.Basic.Properties]


def text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def number(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("ascii", "replace")
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def timestamp(epoch_s: float) -> str:
    # As text: pamqp sends a Python float as a 32-bit float, which rounds epoch seconds
    # to minutes.
    return f"{epoch_s:.6f}"


def expiration(seconds: float) -> str:
    """The per-message TTL property: whole milliseconds, as text (at least 1: 0 means now)."""
    return str(max(int(seconds * 1000), 1))


def clamp_priority(value: int) -> int:
    """A message's priority within what its queue honours (0 to MAX_PRIORITY - 1)."""
    return min(max(int(value), 0), MAX_PRIORITY - 1)


def is_due(eta: float | None, now: float) -> bool:
    """Does a message with this eta go straight to its queue (rather than to a delay level)?"""
    return eta is None or eta <= now + DUE_SLACK_S


def message_headers(
    message_id: str, queue: str, deliveries: int, *, key: str | None, expires: float | None, eta: float | None, now: float
) -> dict[str, Any]:
    """The offload headers of a published copy, but its copy token (`H_COPY`)."""
    headers: dict[str, Any] = {H_ID: message_id, H_QUEUE: queue, H_DELIVERIES: deliveries}
    if key is not None:
        headers[H_KEY] = key
    if expires is not None:
        headers[H_EXPIRES] = timestamp(expires)
    if eta is not None and eta > now:
        # Due within the slack, it goes straight to its queue; the eta tells the consumer to
        # hold it back until then.
        headers[H_ETA] = timestamp(eta)
    return headers


def headers_of(message: Incoming) -> dict[str, Any]:
    return message.headers or {}


def key_of(message: Incoming) -> str | None:
    """The dedup key a delivered copy carries, if any."""
    return text(headers_of(message).get(H_KEY))


def copy_of(message: Incoming) -> str | None:
    """The copy token of a delivered copy (`H_COPY`)."""
    return text(headers_of(message).get(H_COPY))


#: How long `still_open`'s round trip may take before the channel counts as gone.
PROBE_TIMEOUT_S = 5.0


async def still_open(channel: Any) -> bool:
    """One round trip on a consumer channel (a passive declare of ``amq.direct``, which every
    server has): False when the connection turns out closed, or does not answer in time."""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            await channel.exchange_declare("amq.direct", passive=True)
    except (aiormq.exceptions.AMQPError, ConnectionError, TimeoutError, RuntimeError):
        return False
    return True


def is_stale(message: Incoming) -> bool:
    """True when the channel the message came on has closed: its delivery tag is void."""
    try:
        message.channel  # noqa: B018 - raises once the channel is closed
    except aiormq.exceptions.ChannelInvalidStateError:
        return True
    return False
