"""Publishing to RabbitMQ from the caller's own thread, for the sync face: `delay()` on
``amqp://`` sends with py-amqp (the client Celery's kombu uses) and waits in the caller's thread
for RabbitMQ's confirm, instead of hopping to offload's event loop thread, through aiormq's
write queue and writer task, and back. On a local RabbitMQ that takes a quarter of a millisecond
off the moment the message leaves, so off `delay()` and off a task's round trip (see
docs/performance.md).

It sends what is simple to send and leaves the rest to the loop's `AmqpBroker` by returning
False: a queue this process has not declared yet (the loop declares it, with offload's
arguments and its registry entry, on the first send), a message not yet due (the delay levels),
a keyed message, a moment when every connection is busy, and every failure of a connection.
The loop's publish then retries, reconnects, declares again what was deleted, and gives up with
`BrokerUnavailable` after its bounded wait. A failure after the message left may have reached
RabbitMQ all the same; the loop sends it again: at least once, as the loop's own retry does.

Connections are pooled (``sync_connections`` URL parameter, default 4, 0 to turn this off), one
thread on a connection at a time. They have no heartbeats: a connection waiting in the pool has
nothing to say, and one that died meanwhile fails at its next publish and is replaced. After a
fork the child opens its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable

import amqp
from amqp import spec

from offload.brokers.amqp.connection import vhost
from offload.brokers.amqp.messages import H_COPY, PERSISTENT, clamp_priority, is_due, message_headers
from offload.brokers.base import DirectSender, OutgoingMessage
from offload.config import BrokerURL
from offload.errors import BrokerError

log = logging.getLogger("offload.brokers.amqp")

DEFAULT_CONNECTIONS = 4
# How long a publish here waits for its confirm before the loop takes over (RabbitMQ confirms
# in about a millisecond; a blocked connection, under a resource alarm, never does).
_CONFIRM_WAIT_S = 5.0
# Opening a connection here is an optimisation: a broker that does not answer soon is left to
# the loop, which waits for it as long as ``connect_timeout`` says.
_CONNECT_WAIT_S = 1.0
# After a connection could not be opened, the loop sends for this long without trying again.
_BACKOFF_S = 1.0


def _raise_on_nack(method: tuple[int, int], *args: object) -> None:
    if method == spec.Basic.Nack:
        raise amqp.exceptions.MessageNacked()


class _Link:
    """One connection and its channel in confirm mode. The channel publishes and waits for the
    confirm in two steps (py-amqp's confirming publish does both at once), so that the caller
    can work in between."""

    def __init__(self, connection: amqp.Connection) -> None:
        self.connection = connection
        self.channel = connection.channel()
        self.channel.confirm_select()


class AmqpDirect(DirectSender):
    def __init__(
        self,
        url: BrokerURL,
        queue_name: Callable[[str], str],
        declared: Callable[[str], bool],
        client_name: str,
        connect_timeout_s: float,
    ) -> None:
        self._url = url
        self._queue_name = queue_name
        self._declared = declared
        self._client_name = client_name
        self._connect_wait_s = min(connect_timeout_s, _CONNECT_WAIT_S)
        self._confirm_wait_s = min(url.param_float("publish_timeout", 30.0), _CONFIRM_WAIT_S)
        self._max = int(url.param_float("sync_connections", DEFAULT_CONNECTIONS))
        self._lock = threading.Lock()
        self._idle: list[_Link] = []
        self._open = 0  # connections in use or idle
        self._pid = os.getpid()
        self._closed = False
        self._retry_at = 0.0

    def enqueue(self, message: OutgoingMessage, meanwhile: Callable[[], None] | None = None) -> bool:
        now = time.time()
        if message.key is not None or not is_due(message.eta, now) or not self._declared(message.queue):
            return False
        link = self._take()
        if link is None:
            return False
        headers = message_headers(message.id, message.queue, 0, key=None, expires=message.expires, eta=message.eta, now=now)
        headers[H_COPY] = uuid.uuid4().hex
        outgoing = amqp.Message(
            message.body,
            application_headers=headers,
            priority=clamp_priority(message.priority),
            delivery_mode=PERSISTENT,
            message_id=message.id,
        )
        try:
            # Mandatory, as on the loop: a message RabbitMQ cannot route (its queue was deleted
            # behind this process's back) comes back as an error, and the loop declares again.
            link.channel.basic_publish(outgoing, exchange="", routing_key=self._queue_name(message.queue), mandatory=True)
        except (amqp.exceptions.AMQPError, OSError) as e:
            return self._failed(link, message, e)
        # While RabbitMQ routes and writes the message: the caller's own work (the QUEUED state),
        # off the path of the worker that is about to receive it.
        error: Exception | None = None
        if meanwhile is not None:
            try:
                meanwhile()
            except Exception as e:
                error = e
        try:
            link.channel.wait([spec.Basic.Ack, spec.Basic.Nack], callback=_raise_on_nack, timeout=self._confirm_wait_s)
        except amqp.exceptions.MessageNacked:
            self._drop(link)
            raise BrokerError(f"RabbitMQ at {self._url.masked} refused a message for {message.queue!r} (nack)") from None
        except (amqp.exceptions.AMQPError, OSError) as e:
            return self._failed(link, message, e)
        self._give_back(link)
        if error is not None:
            raise error
        return True

    def _failed(self, link: _Link, message: OutgoingMessage, error: BaseException) -> bool:
        # The connection's state is unknown (a confirm may still be on its way): never reuse it.
        self._drop(link)
        log.info("sending %s from the caller's thread failed (%s); sending it through the event loop", message.id, type(error).__name__)
        return False

    def _take(self) -> _Link | None:
        with self._lock:
            if self._closed or self._max <= 0:
                return None
            if os.getpid() != self._pid:
                # Forked: the parent's sockets are not ours to use (or to close with a frame).
                self._idle, self._open, self._pid = [], 0, os.getpid()
            if self._idle:
                return self._idle.pop()
            if self._open >= self._max or time.monotonic() < self._retry_at:
                return None
            self._open += 1
        try:
            return self._connect()
        except (amqp.exceptions.AMQPError, OSError) as e:
            log.info("could not open a sending connection in the caller's thread (%s); using the event loop", type(e).__name__)
            with self._lock:
                self._open -= 1
                self._retry_at = time.monotonic() + _BACKOFF_S
            return None

    def _connect(self) -> _Link:
        url = self._url
        host = url.host or "localhost"
        if ":" in host:
            host = f"[{host}]"
        connection = amqp.Connection(
            host=f"{host}:{url.port or 5672}",
            userid=url.username or "guest",
            password=url.password or "guest",
            virtual_host=vhost(url.path),
            connect_timeout=self._connect_wait_s,
            read_timeout=self._confirm_wait_s,
            write_timeout=self._confirm_wait_s,
            heartbeat=0,
            client_properties={"connection_name": f"{self._client_name} sync producer"},
        )
        try:
            connection.connect()
            return _Link(connection)
        except BaseException:
            _close_quietly(connection)
            raise

    def _give_back(self, link: _Link) -> None:
        with self._lock:
            if not self._closed and os.getpid() == self._pid:
                self._idle.append(link)
                return
        _close_quietly(link.connection)

    def _drop(self, link: _Link) -> None:
        with self._lock:
            if os.getpid() == self._pid:
                self._open -= 1
        _close_quietly(link.connection, polite=False)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            mine = os.getpid() == self._pid
        for link in idle:
            if mine:
                _close_quietly(link.connection)


def _close_quietly(connection: amqp.Connection, polite: bool = True) -> None:
    """Close ``connection``; ``polite`` says goodbye to RabbitMQ first, otherwise the socket is
    just shut (a connection in an unknown state has nothing more to say)."""
    try:
        if polite:
            connection.close()
    except (amqp.exceptions.AMQPError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError):
            connection.collect()
