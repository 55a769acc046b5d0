"""Wake-ups across processes for the sqlite backend, without polling.

SQLite has no notifications of its own, so processes sharing a database tell each other what
changed through a directory beside it, ``<db>.notify/``:

* every process that waits on something (a worker's fetch, a result watcher, a channel
  subscriber) binds one unix datagram socket there, named ``<pid>-<random>.sock``; a daemon
  thread reads it and passes the topics it receives to the process's `Signals` hub;
* a process that changed something sends one datagram, the topics separated by newlines, to
  every socket in the directory, and signals its own waiters directly.

A signal only says "look again", so losing one costs latency, never correctness: every waiter
also re-reads the database on a slow safety poll (`SAFETY_POLL_S`). That is what lets sending never block: a
peer whose queue is full (EAGAIN) gets the topics retried briefly from a helper thread and
then dropped; a socket nobody is bound to any more (its process died) is removed.

The directory listing is cached and re-read when the directory's mtime moves (a process came
or went), when the cached listing is too close to that mtime to trust (the kernel's mtime
clock is coarse), or after a second. Topics must not contain newlines.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import logging
import os
import re
import secrets
import select
import socket
import threading
import time
import weakref
from collections.abc import Collection, Iterable

from offload import forks
from offload.brokers.signals import Listener, Signals
from offload.retrying import Backoff

__all__ = ["SAFETY_POLL_S", "Notifier", "notify_dir", "open_notifier"]

log = logging.getLogger("offload.brokers.sqlite")

# Waiters re-read this often even without a wake-up. Read as ``notify.SAFETY_POLL_S`` at each
# wait, so that a test can lengthen it in one place.
SAFETY_POLL_S = 1.0

_SOCKET_NAME = re.compile(r"^(\d+)-[0-9a-f]+\.sock$")
_MAX_DATAGRAM = 60_000  # well under the default socket buffers; a bigger batch is split
_RECV_BUFFER = 65_536
_RELIST_S = 1.0  # the cached listing is re-read at least this often
_RACY_NS = 50_000_000  # a listing taken this soon after the directory's mtime may miss an entry
_CHECK_BOUND_S = 2.0  # how often the reader checks that its socket file still exists
_RETRY_BACKOFF = Backoff(first_s=0.001, cap_s=0.05)  # between resends to a congested peer
_RETRY_GIVE_UP_S = 2.0  # past this the receiver's safety poll is as good as a retry
_PENDING_CAP = 10_000  # topics kept per congested peer
_SUN_PATH_MAX = 107  # sizeof(sun_path) - 1 on Linux; macOS allows 103, checked by bind anyway
_NAME_MAX = 7 + 1 + 8 + 5  # pid, dash, 8 hex digits, ".sock"

_HAS_UNIX = hasattr(socket, "AF_UNIX")


class Notifier:
    """The cross-process signal hub of one database. Get it with `open_notifier`."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._users = 0
        self._init_process_state()

    def _init_process_state(self) -> None:
        # Everything here belongs to one process; a forked child starts again from this.
        self.signals = Signals()
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._recv: socket.socket | None = None
        self._name: str | None = None
        self._ino = 0
        self._bind_failed = False
        self._send: socket.socket | None = None
        self._send_failed = False
        self._dirfd: int | None = None
        self._prefix: str | None = None
        self._peers: tuple[str, ...] = ()
        self._listed_mtime = -1
        self._listed_at_ns = 0
        self._relist_at = 0.0
        self._bad: set[str] = set()  # names that are not sockets and cannot be removed
        self._pending: dict[str, set[str]] = {}
        self._retry_event = threading.Event()
        self._retrier: threading.Thread | None = None
        self._closed = False

    # -- receiving -----------------------------------------------------------------------
    def listen(self, topics: Iterable[str]) -> Listener:
        """A listener on these topics, woken by this process and by every other one. The
        socket is bound before this returns, so a change committed after it is not missed."""
        if self._recv is None and not self._bind_failed:
            self._bind()
        return self.signals.listen(topics)

    def _bind(self) -> None:
        with self._lock:
            if self._recv is not None or self._bind_failed or self._closed:
                return
            try:
                sock = self._bind_socket()
            except OSError as e:
                # Waiters still work, on their safety poll; say so once.
                self._bind_failed = True
                log.warning("cannot listen for changes in %s (%s); waiters fall back to polling", self.directory, e)
                return
            thread = threading.Thread(target=self._read, args=(sock,), name="offload-notify", daemon=True)
            thread.start()

    def _bind_socket(self) -> socket.socket:
        # Called with the lock held.
        if not _HAS_UNIX:
            raise OSError(errno.EAFNOSUPPORT, "unix sockets are not available")
        os.makedirs(self.directory, exist_ok=True)
        prefix = self._address_prefix()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            name = f"{os.getpid()}-{secrets.token_hex(4)}.sock"
            sock.bind(prefix + name)
            sock.setblocking(False)
            self._ino = os.stat(os.path.join(self.directory, name)).st_ino
        except OSError:
            sock.close()
            raise
        self._recv, self._name = sock, name
        return sock

    def _address_prefix(self) -> str:
        if self._prefix is None:
            if len(self.directory) + 1 + _NAME_MAX <= _SUN_PATH_MAX:
                self._prefix = self.directory + os.sep
            elif os.path.isdir("/proc/self/fd"):
                # The path is too long for a socket address; reach the directory through a
                # descriptor instead (Linux), which every process can do on its own.
                self._dirfd = os.open(self.directory, getattr(os, "O_PATH", os.O_RDONLY))
                self._prefix = f"/proc/self/fd/{self._dirfd}/"
            else:
                raise OSError(errno.ENAMETOOLONG, f"{self.directory} is too long for a unix socket address")
        return self._prefix

    def _check_dirfd(self) -> None:
        # Called with the lock held. A descriptor-based address keeps naming the directory it
        # was opened on; if the directory was removed and made again, open the new one.
        if self._dirfd is None:
            return
        try:
            same = os.stat(self.directory).st_ino == os.fstat(self._dirfd).st_ino
        except OSError:
            same = False
        if not same:
            os.close(self._dirfd)
            self._dirfd = self._prefix = None
            os.makedirs(self.directory, exist_ok=True)
            self._address_prefix()

    def _read(self, sock: socket.socket) -> None:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        try:
            while True:
                if not poller.poll(_CHECK_BOUND_S * 1000):
                    new = self._rebind_if_removed(sock)
                    if new is None:
                        return
                    if new is not sock:
                        poller.unregister(sock)
                        sock.close()
                        sock = new
                        poller.register(sock, select.POLLIN)
                    continue
                if self._recv is not sock:
                    return  # closed (a wake-up datagram told us so)
                topics: set[str] = set()
                # Drain everything queued so a burst becomes one round of wake-ups, and the
                # senders' small queue (net.unix.max_dgram_qlen) empties quickly.
                while True:
                    try:
                        data = sock.recv(_RECV_BUFFER)
                    except (BlockingIOError, InterruptedError):
                        break
                    if data:
                        topics.update(data.decode("utf-8", "replace").split("\n"))
                if topics:
                    self.signals.notify(topics)
        except OSError as e:
            log.warning("stopped listening for changes in %s (%s); waiters fall back to polling", self.directory, e)
        finally:
            sock.close()

    def _rebind_if_removed(self, sock: socket.socket) -> socket.socket | None:
        """Someone removed our socket file (a cleanup script, a test): bind a new one, or
        nobody could reach us any more. Returns the socket to read, None to stop."""
        with self._lock:
            if self._recv is not sock:
                return None
            name = self._name
            try:
                if name is not None and os.stat(os.path.join(self.directory, name)).st_ino == self._ino:
                    return sock
            except OSError:
                pass
            try:
                self._check_dirfd()
                return self._bind_socket()
            except OSError as e:
                log.warning("cannot listen for changes in %s again (%s); waiters fall back to polling", self.directory, e)
                self._recv = self._name = None
                self._bind_failed = True
                return None

    # -- sending -------------------------------------------------------------------------
    def notify(self, topics: Collection[str]) -> None:
        """Wake the waiters on these topics here and in every other process. Never blocks."""
        if not topics:
            return
        self.signals.notify(topics)
        if self._closed:
            return
        names = self._peer_names()
        if not names:
            return
        payloads = _payloads(topics)
        for name in names:
            extra = self._pending.pop(name, None) if self._pending else None
            if extra:
                extra.update(topics)
                self._send_to(name, _payloads(extra), extra)
            else:
                self._send_to(name, payloads, topics)

    def _sender(self) -> tuple[socket.socket, str] | None:
        with self._lock:
            if self._send is None and not self._closed and not self._send_failed:
                try:
                    self._address_prefix()
                    self._send = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    self._send.setblocking(False)
                except OSError as e:
                    self._send_failed = True
                    log.warning("cannot signal changes in %s (%s); waiters fall back to polling", self.directory, e)
            if self._send is None or self._prefix is None:
                return None
            return self._send, self._prefix

    def _send_to(self, name: str, payloads: list[bytes], topics: Collection[str]) -> bool:
        """True when delivered or when the peer is gone; False when deferred (congested)."""
        sender = self._sender() if self._send is None else (self._send, self._prefix or "")
        if sender is None:
            return True
        sock, prefix = sender
        address = prefix + name
        for payload in payloads:
            try:
                sock.sendto(payload, address)
            except (BlockingIOError, InterruptedError):
                self._defer(name, topics)
                return False
            except (ConnectionRefusedError, FileNotFoundError) as e:
                self._forget(name, stale=isinstance(e, ConnectionRefusedError))
                return True
            except OSError:
                self._forget(name, stale=False)
                return True
        return True

    def _defer(self, name: str, topics: Collection[str]) -> None:
        with self._lock:
            pending = self._pending.setdefault(name, set())
            if len(pending) < _PENDING_CAP:
                pending.update(topics)
            if self._retrier is None and not self._closed:
                self._retrier = threading.Thread(target=self._retry, name="offload-notify-retry", daemon=True)
                self._retrier.start()
        self._retry_event.set()

    def _retry(self) -> None:
        while True:
            self._retry_event.wait()
            self._retry_event.clear()
            if self._closed:
                return
            started = time.monotonic()
            for pause in _RETRY_BACKOFF.pauses():
                if not self._pending or self._closed:
                    break
                if time.monotonic() - started > _RETRY_GIVE_UP_S:
                    with self._lock:
                        self._pending.clear()
                    break
                time.sleep(pause)
                with self._lock:
                    batch, self._pending = self._pending, {}
                for name, topics in batch.items():
                    self._send_to(name, _payloads(topics), topics)

    def _forget(self, name: str, *, stale: bool) -> None:
        # ECONNREFUSED: a socket file nobody is bound to (its process died) or not a socket
        # at all. Remove it so nobody tries again; what cannot be removed is skipped.
        removed = False
        if stale:
            try:
                os.unlink(os.path.join(self.directory, name))
                removed = True
            except FileNotFoundError:
                removed = True
            except OSError:
                pass
        with self._lock:
            if not removed:
                self._bad.add(name)
            self._pending.pop(name, None)
            self._peers = tuple(p for p in self._peers if p != name)

    def _peer_names(self) -> tuple[str, ...]:
        try:
            mtime = os.stat(self.directory).st_mtime_ns
        except OSError:
            return ()
        if (
            mtime == self._listed_mtime
            and self._listed_at_ns - mtime > _RACY_NS
            and time.monotonic() < self._relist_at
        ):
            return self._peers
        with self._lock:
            listed_at = time.time_ns()
            try:
                self._check_dirfd()
                names = os.listdir(self.directory)
            except OSError:
                return ()
            present = {n for n in names if _SOCKET_NAME.match(n)}
            self._bad &= present
            self._peers = tuple(n for n in present if n != self._name and n not in self._bad)
            self._listed_mtime, self._listed_at_ns = mtime, listed_at
            self._relist_at = time.monotonic() + _RELIST_S
            return self._peers

    # -- lifetime ------------------------------------------------------------------------
    def _shutdown(self) -> None:
        with self._lock:
            self._closed = True
            sock, name = self._recv, self._name
            self._recv = self._name = None
            send, self._send = self._send, None
            dirfd, self._dirfd = self._dirfd, None
        self._retry_event.set()
        if sock is not None and name is not None:
            # Wake the reader so it sees it is closed; it closes its socket itself.
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                    s.setblocking(False)
                    s.sendto(b"", (self._prefix or "") + name)
            except OSError:
                pass
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.directory, name))
        if send is not None:
            send.close()
        if dirfd is not None:
            os.close(dirfd)

    def release(self) -> None:
        """Drop one user; the last one stops the reader and removes the socket."""
        with _registry_lock:
            self._users -= 1
            if self._users > 0:
                return
            if _registry.get(self.directory) is self:
                del _registry[self.directory]
        self._shutdown()

    def _after_fork_in_child(self) -> None:
        # The reader thread does not exist here and the sockets belong to the parent: close
        # our copies (never unlink the parent's file) and start afresh on first use.
        for sock in (self._recv, self._send):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
        dirfd = self._dirfd
        self._init_process_state()
        # The descriptor was inherited and still names the directory; keep the same address.
        if dirfd is not None:
            self._dirfd, self._prefix = dirfd, f"/proc/self/fd/{dirfd}/"

    def _unlink_at_exit(self) -> None:
        name = self._name
        if name is not None and self._pid == os.getpid():
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.directory, name))


def _payloads(topics: Iterable[str]) -> list[bytes]:
    out: list[bytes] = []
    chunk: list[bytes] = []
    size = 0
    for topic in topics:
        raw = topic.encode()
        if chunk and size + len(raw) + 1 > _MAX_DATAGRAM:
            out.append(b"\n".join(chunk))
            chunk, size = [], 0
        chunk.append(raw)
        size += len(raw) + 1
    if chunk:
        out.append(b"\n".join(chunk))
    return out


_registry: dict[str, Notifier] = {}
_registry_lock = threading.Lock()
_all: weakref.WeakSet[Notifier] = weakref.WeakSet()


def notify_dir(db_path: str) -> str:
    """The directory of a database's sockets, the same for every process that opens it."""
    return os.path.realpath(db_path) + ".notify"


def open_notifier(db_path: str) -> Notifier:
    """The process's notifier for a database file, with one more user (see `release`)."""
    directory = notify_dir(db_path)
    with _registry_lock:
        notifier = _registry.get(directory)
        if notifier is None:
            notifier = _registry[directory] = Notifier(directory)
            _all.add(notifier)
        notifier._users += 1
        return notifier


def _after_fork_in_child() -> None:
    global _registry_lock
    _registry_lock = threading.Lock()
    for notifier in list(_all):
        notifier._after_fork_in_child()


def _at_exit() -> None:
    for notifier in list(_all):
        notifier._unlink_at_exit()


forks.after_fork(_after_fork_in_child)
atexit.register(_at_exit)
