"""The message envelope and its codec: serialize, compress above a threshold, sign.

Wire format (every broker carries these bytes unchanged)::

    b"OF" | version (1 byte) | flags (1 byte) | [HMAC-SHA256 (32 bytes) if signed] | payload

flags: bits 0-3 the serializer code, bit 4 zlib-compressed, bit 5 signed. The signature
covers the header and the payload, so neither can be altered without detection.

Values (task states, channel and control messages) are the serializer's bytes alone, except
with a serializer that runs code when loading (pickle)::

    HMAC-SHA256 under the value key (32 bytes) | payload

The value key is derived from the secret under a label of its own, so a value's signature
never passes for an envelope's, nor the other way round.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import time
import zlib
from dataclasses import dataclass, field, fields
from typing import Any

from offload.errors import ConfigError, MessageError, SerializationError, SignatureError
from offload.preview import call_preview
from offload.serializers import BY_CODE, Serializer

MAGIC = b"OF"
VERSION = 1
_COMPRESSED = 0x10
_SIGNED = 0x20
_DIGEST = 32
_VALUE_KEY_LABEL = b"offload value signature v1"


@dataclass(slots=True)
class Envelope:
    """Everything a worker needs to run one task attempt."""

    id: str
    name: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    queue: str = "default"
    priority: int = 0
    eta: float | None = None  # epoch seconds: not before
    expires: float | None = None  # epoch seconds: never start after
    attempt: int = 1  # counts from 1
    # None below means "the task's own default", filled in by the worker (see with_defaults).
    retries: int | None = None  # extra attempts allowed after the first
    retry_backoff: float | None = None  # seconds, doubled each attempt
    time_limit: float | None = None
    soft_time_limit: float | None = None
    key: str | None = None  # deduplication key
    queued_at: float = field(default_factory=time.time)
    headers: dict[str, Any] = field(default_factory=dict)

    def with_defaults(self, retries: int, retry_backoff: float, time_limit: float | None,
                      soft_time_limit: float | None, expires_after: float | None) -> Envelope:
        """Fill, in place, what the sender left to the task's own options (it may not have the
        code). Returns the envelope itself."""
        if self.retries is None:
            self.retries = retries
        if self.retry_backoff is None:
            self.retry_backoff = retry_backoff
        if self.time_limit is None:
            self.time_limit = time_limit
        if self.soft_time_limit is None:
            self.soft_time_limit = soft_time_limit
        if self.expires is None and expires_after is not None:
            self.expires = self.queued_at + expires_after
        return self

    def state_meta(self) -> dict[str, Any]:
        """What a task's states keep of its message: the owner and workflow parent from the
        headers, and a preview of the call. Every state is written whole, so the sender's
        queued state and the worker's started one both start from this."""
        meta = {k: v for k, v in self.headers.items() if k in ("owner", "parent")}
        meta["call"] = call_preview(self.name, self.args, self.kwargs)
        return meta

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _ENVELOPE_FIELDS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Envelope:
        """The envelope a decoded payload describes, every field checked for its type and range:
        a field a worker would trip over later (a string time limit, a negative retry count)
        is refused here, naming it, so the message is dead-lettered instead of failing the
        worker on each delivery. Unknown fields are ignored (a newer sender may add some)."""
        missing = [name for name in ("id", "name") if name not in data]
        if missing:
            raise MessageError(f"not an offload envelope: no {' or '.join(missing)}")
        checked = {name: _check_field(name, value) for name, value in data.items() if name in _ENVELOPE_NAMES}
        return cls(**checked)


#: The priorities a sender may give (see `Options.merge`): 0 to 9, higher runs first.
PRIORITIES = range(10)
# Epoch seconds a worker can turn into a datetime (up to the year 9999).
_LATEST_TIMESTAMP = 253402300799.0


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _bad(name: str, value: Any, expected: str) -> MessageError:
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return MessageError(f"bad envelope field {name!r}: expected {expected}, got {shown}")


def _check_field(name: str, value: Any) -> Any:
    """``value`` as the envelope holds it, or a MessageError naming the field."""
    if name in ("id", "name", "queue"):
        if not isinstance(value, str) or not value:
            raise _bad(name, value, "a non-empty string")
        return value
    if name == "key":
        if value is not None and not isinstance(value, str):
            raise _bad(name, value, "a string or null")
        return value
    if name == "args":
        if not isinstance(value, (list, tuple)):
            raise _bad(name, value, "a list")
        return tuple(value)
    if name in ("kwargs", "headers"):
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise _bad(name, value, "a mapping with string keys")
        return value
    if name == "priority":
        if not _is_int(value) or value not in PRIORITIES:
            raise _bad(name, value, f"an int from {PRIORITIES[0]} to {PRIORITIES[-1]}")
        return value
    if name == "attempt":
        if not _is_int(value) or value < 1:
            raise _bad(name, value, "an int >= 1")
        return value
    if name == "retries":
        if value is not None and (not _is_int(value) or value < 0):
            raise _bad(name, value, "an int >= 0 or null")
        return value
    if name in ("retry_backoff", "time_limit", "soft_time_limit"):
        if value is not None and (not _is_number(value) or value < 0):
            raise _bad(name, value, "a finite number of seconds >= 0 or null")
        return value
    if name in ("eta", "expires", "queued_at"):
        nullable = name != "queued_at"
        if (value is None and nullable) or (_is_number(value) and 0 <= value <= _LATEST_TIMESTAMP):
            return value
        raise _bad(name, value, "epoch seconds" + (" or null" if nullable else ""))
    raise AssertionError(f"no check for envelope field {name!r}")  # a field added without one


_ENVELOPE_FIELDS = tuple(f.name for f in fields(Envelope))
_ENVELOPE_NAMES = frozenset(_ENVELOPE_FIELDS)


class Codec:
    """Turns envelopes and results into bytes and back, the same way in every process."""

    def __init__(self, serializer: Serializer, *, secret: bytes | None = None, compress_over: int = 8192) -> None:
        self.serializer = serializer
        self.secret = secret
        self.compress_over = compress_over
        # Set only for a serializer that runs code when loading: JSON and msgpack values carry
        # no signature and pay nothing for it.
        self._value_key: bytes | None = None
        if serializer.runs_code:
            if not secret:
                raise ConfigError(
                    f"serializer={serializer.name!r} needs a secret=...: loading it runs code, so offload loads "
                    "only values signed with the app's secret (else anyone who can write to the broker or "
                    "result store runs code in every process)"
                )
            self._value_key = hmac.new(secret, _VALUE_KEY_LABEL, hashlib.sha256).digest()

    # Values (results, states, channel messages) use the serializer alone, signed when loading
    # them could run code.
    def dumps(self, value: Any) -> bytes:
        payload = self.serializer.dumps(value)
        if self._value_key is None:
            return payload
        return hmac.new(self._value_key, payload, hashlib.sha256).digest() + payload

    def loads(self, data: bytes) -> Any:
        if self._value_key is None:
            return self.serializer.loads(data)
        digest, payload = data[:_DIGEST], data[_DIGEST:]
        expected = hmac.new(self._value_key, payload, hashlib.sha256).digest()
        if len(digest) < _DIGEST or not hmac.compare_digest(digest, expected):
            raise SignatureError(
                f"{self.serializer.name} value refused unread: its signature is missing or wrong "
                "(not written by an app with this secret)"
            )
        return self.serializer.loads(payload)

    def encode(self, env: Envelope) -> bytes:
        payload = self.serializer.dumps(env.to_dict())
        flags = self.serializer.code
        if len(payload) > self.compress_over:
            payload = zlib.compress(payload, 6)
            flags |= _COMPRESSED
        if self.secret is None:
            return MAGIC + bytes((VERSION, flags)) + payload
        flags |= _SIGNED
        header = MAGIC + bytes((VERSION, flags))
        digest = hmac.new(self.secret, header + payload, hashlib.sha256).digest()
        return header + digest + payload

    def decode(self, data: bytes) -> Envelope:
        if len(data) < 4 or data[:2] != MAGIC:
            raise MessageError("not an offload message (bad magic bytes)")
        version, flags = data[2], data[3]
        if version != VERSION:
            raise MessageError(f"unsupported message version {version}")
        body = data[4:]
        if flags & _SIGNED:
            if self.secret is None:
                raise SignatureError("message is signed but this app has no secret to check it")
            digest, body = body[:_DIGEST], body[_DIGEST:]
            expected = hmac.new(self.secret, data[:4] + body, hashlib.sha256).digest()
            if not hmac.compare_digest(digest, expected):
                raise SignatureError("bad signature: the message was tampered with or signed with another secret")
        elif self.secret is not None:
            raise SignatureError("unsigned message refused: this app requires signed messages")
        if flags & _COMPRESSED:
            try:
                body = zlib.decompress(body)
            except zlib.error as e:
                raise MessageError(f"corrupt compressed payload: {e}") from None
        serializer_cls = BY_CODE.get(flags & 0x0F)
        if serializer_cls is None:
            raise MessageError(f"unknown serializer code {flags & 0x0F}")
        if serializer_cls.code != self.serializer.code:
            # Never unpickle a message that merely claims to be pickle: only the app's own
            # serializer may decode envelopes.
            raise MessageError(f"message uses serializer {serializer_cls.name!r}, this app uses {self.serializer.name!r}")
        try:
            data_dict = self.serializer.loads(body)
        except (SerializationError, ValueError, TypeError, KeyError, EOFError) as e:
            raise MessageError(f"undecodable payload: {e}") from None
        except Exception as e:  # msgpack and pickle raise their own types
            raise MessageError(f"undecodable payload: {type(e).__name__}: {e}") from None
        if not isinstance(data_dict, dict):
            raise MessageError("not an offload envelope: payload is not a mapping")
        return Envelope.from_dict(data_dict)


def new_task_id() -> str:
    """128 random bits, URL-safe (22 characters)."""
    return secrets.token_urlsafe(16)
