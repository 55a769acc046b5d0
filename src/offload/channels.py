"""Pub/sub channel names that offload keeps for itself."""

from __future__ import annotations

from offload.errors import ConfigError

#: Channels named with this prefix are offload's own: user code may neither publish to them nor
#: subscribe to them, and the gateway never serves them (offload writes them through the store).
RESERVED_CHANNEL_PREFIX = "__offload."
#: Workers listen here for cancellations of running tasks.
CONTROL_CHANNEL = RESERVED_CHANNEL_PREFIX + "control"


def check_channel_name(channel: str) -> str:
    """``channel`` when user code may use it; a `ConfigError` for a name offload reserves."""
    if channel.startswith(RESERVED_CHANNEL_PREFIX):
        raise ConfigError(f"channel {channel!r} is reserved: names starting with {RESERVED_CHANNEL_PREFIX!r} are offload's own")
    return channel
