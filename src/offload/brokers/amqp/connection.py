"""The connections to RabbitMQ: the URL's settings, opening a robust aio-pika connection within
``connect_timeout``, and the producer's connection with its two channels (publishing with
confirms, and a plain one for declarations, reads and deletions).

The producer's connection serves enqueues and admin calls; the consumer opens a second one
(`open_connection`), so that RabbitMQ's flow control on publishers never holds back acks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aio_pika.connection import make_url

from offload.brokers.amqp.acks import TRANSIENT
from offload.config import BrokerURL
from offload.errors import BrokerError, BrokerUnavailable, ConfigError
from offload.retrying import Backoff, retry_within

log = logging.getLogger("offload.brokers.amqp")

T = TypeVar("T")

RECONNECT_INTERVAL_S = 1.0
# Errors after which opening a connection again can succeed.
CONNECT_TRANSIENT = (*TRANSIENT, aiormq.exceptions.AMQPError, RuntimeError)
# Waiting through a lost connection: pauses of 50 ms doubling up to 1 s, until publish_timeout.
WAIT_BACKOFF = Backoff(first_s=0.05, cap_s=1.0)


@dataclass(frozen=True, slots=True)
class Settings:
    """The URL parameters the loop's broker reads (the sync face reads its own)."""

    tls: bool
    #: seconds of retrying a connection before `BrokerUnavailable`
    connect_timeout_s: float
    #: how long a call waits for a lost connection to come back
    publish_timeout_s: float
    #: unacknowledged deliveries per consumed queue; 0: from the first fetch's limit
    prefetch: int

    @classmethod
    def from_url(cls, url: BrokerURL) -> Settings:
        if url.scheme not in ("amqp", "amqps"):
            raise ConfigError(f"not an AMQP URL: {url.masked}")
        return cls(
            tls=url.scheme == "amqps",
            connect_timeout_s=url.param_float("connect_timeout", 5.0),
            publish_timeout_s=url.param_float("publish_timeout", 30.0),
            prefetch=int(url.param_float("prefetch", 0)),
        )


def vhost(path: str) -> str:
    """The virtual host named by a URL's path, %-decoded (an empty path is ``/``)."""
    name = urllib.parse.unquote(path[1:] if path.startswith("/") else path)
    return name or "/"


def cancelled_from_outside() -> bool:
    """Is the current task being cancelled (rather than a future it awaited, by aiormq)?"""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def discard(conn: AbstractRobustConnection) -> None:
    with contextlib.suppress(Exception):
        await conn.close()


class Connections:
    """The producer's connection and channels, and what opens connections for the consumer."""

    def __init__(self, url: BrokerURL, settings: Settings, client_name: str) -> None:
        self.url = url
        self.settings = settings
        self.client_name = client_name
        self.conn: AbstractRobustConnection | None = None  # enqueue, admin
        self.publisher: AbstractRobustChannel | None = None
        self._admin: aiormq.abc.AbstractChannel | None = None
        #: The AMQP heartbeat asked of the server: RabbitMQ closes a connection that stays
        #: silent this long, so a frozen worker's deliveries go to another within it. The
        #: broker sets it to its ``lease_s`` (the app's heartbeat timeout) before connecting.
        self.heartbeat_s = 10.0

    # -- what errors say, the password masked -----------------------------------------------
    def scrub(self, text: str) -> str:
        password = self.url.password
        if password:
            for form in {password, urllib.parse.quote(password, safe="")}:
                text = text.replace(form, "***")
        return text

    def reason(self, error: BaseException) -> str:
        text = str(error) or type(error).__name__
        return self.scrub(f"{type(error).__name__}: {text}" if text != type(error).__name__ else text)

    # -- opening ----------------------------------------------------------------------------
    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.settings.tls:
            return None
        params = self.url.params
        context = ssl.create_default_context(cafile=params.get("cafile"))
        if params.get("certfile"):
            context.load_cert_chain(params["certfile"], params.get("keyfile"))
        return context

    async def open_connection(self, role: str) -> AbstractRobustConnection:
        """A robust connection, or `BrokerUnavailable` after ``connect_timeout`` of retries."""
        tls = self.settings.tls
        amqp_url = make_url(
            host=self.url.host or "localhost",
            port=self.url.port or (5671 if tls else 5672),
            login=self.url.username or "guest",
            password=self.url.password or "guest",
            virtualhost=vhost(self.url.path),
            ssl=tls,
            heartbeat=max(round(self.heartbeat_s), 1),
        )
        masked = self.url.masked

        async def attempt(left: float) -> AbstractRobustConnection:
            # What aio_pika.connect_robust does, but holding the connection object: a first
            # attempt cut short by the timeout must be closed, or its reconnection task lives on.
            conn = aio_pika.RobustConnection(
                amqp_url,
                ssl_context=self._ssl_context(),
                client_properties={"connection_name": f"{self.client_name} {role}"},
                reconnect_interval=RECONNECT_INTERVAL_S,
                fail_fast="1",
            )
            try:
                await asyncio.wait_for(conn.connect(timeout=left), left)
            except (aiormq.exceptions.AuthenticationError, aiormq.exceptions.ProbableAuthenticationError) as e:
                await discard(conn)
                raise BrokerUnavailable(masked, f"login refused: {self.reason(e)}") from None
            except aiormq.exceptions.InvalidFrameError as e:
                await discard(conn)
                if "Connection.OpenOk" not in str(e):
                    raise BrokerUnavailable(masked, self.reason(e)) from None
                # RabbitMQ answers connection.open with a close; aiormq drops its reply text.
                raise BrokerUnavailable(
                    masked,
                    f"RabbitMQ refused to open virtual host {vhost(self.url.path)!r} "
                    "(does it exist, and may this user use it?)",
                ) from None
            except CONNECT_TRANSIENT:
                await discard(conn)
                raise
            return conn

        def transient(error: BaseException) -> str | None:
            return self.reason(error) if isinstance(error, CONNECT_TRANSIENT) else None

        def give_up(reason: str, error: BaseException) -> BaseException:
            # No chained client error: it would repeat what ``reason`` says.
            failed = BrokerUnavailable(masked, f"{reason} (gave up after {self.settings.connect_timeout_s:g} s)")
            failed.__suppress_context__ = True
            return failed

        return await retry_within(self.settings.connect_timeout_s, attempt, transient, give_up)

    async def connect(self) -> None:
        """Open the producer's connection and its publishing channel."""
        self.conn = await self.open_connection("producer")
        # Returned (unroutable) messages raise, so an enqueue never vanishes into a queue that
        # was deleted behind this process's back.
        self.publisher = await self.conn.channel(publisher_confirms=True, on_return_raises=True)

    def detach(self) -> AbstractRobustConnection | None:
        """Forget the producer's connection and channels; the connection, for `discard`."""
        conn, self.conn = self.conn, None
        self.publisher = self._admin = None
        return conn

    def require(self) -> AbstractRobustConnection:
        if self.conn is None:
            raise BrokerError(f"the amqp broker for {self.url.masked} is not connected; call connect() first")
        return self.conn

    # -- calls that wait through a lost connection -----------------------------------------------
    async def admin_channel(self, deadline: float) -> aiormq.abc.AbstractChannel:
        """A plain (not robust) channel for declarations, reads and deletions. A failed
        declaration closes its channel; this one is simply opened again, with nothing to restore."""
        if self._admin is not None and not self._admin.is_closed:
            return self._admin
        conn = self.require()
        await asyncio.wait_for(conn.ready(), max(deadline - time.monotonic(), 0.01))
        transport = conn.transport
        if transport is None:
            raise aiormq.exceptions.ChannelInvalidStateError("connection is reconnecting")
        self._admin = await transport.connection.channel(publisher_confirms=False)
        return self._admin

    def _waitable(self, error: BaseException) -> str | None:
        """Why ``error`` is worth waiting through, or None when it must propagate."""
        if isinstance(error, aiormq.exceptions.ChannelClosed):
            return None  # the server refused this call (404, 406...): retrying would not help
        if isinstance(error, TRANSIENT):
            return self.reason(error)
        if isinstance(error, asyncio.CancelledError):
            # aiormq cancels the futures of a connection that dropped; only a cancellation of
            # this task itself must propagate.
            return None if cancelled_from_outside() else "connection lost"
        return None

    async def retrying(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """Run ``call``, waiting through a lost connection for up to ``publish_timeout``.
        May run ``call`` twice when a reply was lost: every caller is at-least-once safe."""
        timeout_s = self.settings.publish_timeout_s

        def give_up(reason: str, error: BaseException) -> BaseException:
            failed = BrokerUnavailable(self.url.masked, f"cannot {what} within {timeout_s:g} s: {reason}")
            failed.__suppress_context__ = True
            return failed

        def waiting(reason: str, pause: float) -> None:
            log.info("%s: waiting for RabbitMQ (%s)", what, reason)

        return await retry_within(timeout_s, lambda _left: call(), self._waitable, give_up, WAIT_BACKOFF, waiting)

    async def admin_call(self, what: str, call: Callable[[aiormq.abc.AbstractChannel], Awaitable[T]]) -> T:
        async def attempt() -> T:
            return await call(await self.admin_channel(time.monotonic() + self.settings.publish_timeout_s))

        return await self.retrying(what, attempt)
