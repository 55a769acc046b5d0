"""Dramatiq on RabbitMQ with publisher confirms: ``send()`` returns once RabbitMQ has the
message, the guarantee offload's ``delay()`` gives. Dramatiq's default leaves them off."""

from __future__ import annotations

import os

# Read by dramatiq_peer as it builds its broker, so it must be set before the import.
os.environ["PEERS_DRAMATIQ_CONFIRM"] = "1"

from benchmarks.peers.dramatiq_peer import DramatiqPeer


class DramatiqConfirmsPeer(DramatiqPeer):
    name = "dramatiq-confirms"


PEER = DramatiqConfirmsPeer
