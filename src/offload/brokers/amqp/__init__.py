"""``amqp://user:password@host:port/vhost`` (and ``amqps://``): RabbitMQ, through aio-pika's
robust connections and channels (reconnection, declarations restored); messages are published
and consumed on their aiormq channels directly (see `publisher` and `received`).

The virtual host is the URL's path, %-encoded (``/%2F`` or an empty path is ``/``). URL
parameters: ``connect_timeout`` (seconds of retrying before `BrokerUnavailable`, default 5),
``publish_timeout`` (how long an enqueue waits for a lost connection to come back, default 30),
``prefetch`` (unacknowledged deliveries per consumed queue; default: twice the first
`fetch`'s limit, see `consumer.window`), and for ``amqps://`` ``cafile``, ``certfile``,
``keyfile``. A sync `delay()` is sent through the app's event loop, by the same aio-pika
connection as an `adelay()` (docs/performance.md, "The sync face on RabbitMQ").

RabbitMQ cannot keep results: an app on ``amqp://`` names its result store (``results=``),
whose key-value primitives also keep what RabbitMQ cannot (dedup keys, claims against
cancellation, the registry of queue names; see `records`).

A module per concern, each telling its own part:

* `connection`: the URL's settings, connecting within ``connect_timeout``, the producer's
  connection and channels, waiting through a lost connection;
* `topology`: the exchanges, queues and delay levels, their names and declaration;
* `messages`: the headers a message carries, its priority and persistence;
* `publisher`: enqueueing with confirms, to a queue or a delay level; dead letters;
* `consumer`: the consumer connection, its consumers, the prefetch, hops between delay levels;
* `buffer`: what the consumers delivered and no fetch has handed out yet;
* `deliveries`: handing out (claims, refills) and settling (ack, requeue, dead letter);
* `acks`: several acks in one frame where AMQP allows it;
* `received`: a consumer's delivery, read lazily;
* `records`: dedup keys, claims and the queue registry in the bound store;
* `admin`: dead letters, replay, purge, stats, `due_within`, flush;
* `broker`: `AmqpBroker`, composed of the above.
"""

from __future__ import annotations

from offload.brokers.amqp.broker import AmqpBroker
from offload.brokers.amqp.messages import MAX_PRIORITY, is_due, message_headers
from offload.brokers.amqp.topology import DELAY_LEVELS_MS
from offload.brokers.base import Broker
from offload.config import BrokerURL

__all__ = ["DELAY_LEVELS_MS", "MAX_PRIORITY", "AmqpBroker", "is_due", "make_broker", "message_headers"]


def make_broker(url: BrokerURL, namespace: str) -> Broker:
    return AmqpBroker(url, namespace)
