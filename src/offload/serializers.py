"""Serializers: values <-> bytes. JSON by default, msgpack when installed, pickle only on request.

JSON carries datetime, date, UUID, Decimal, bytes and tuples through tagged objects
(``{"$dt": "..."}``), so they come back as the same types. A dict that happens to have
a single "$..." key is escaped (as key/value pairs), so user data never collides with a tag.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import pickle
import uuid
from decimal import Decimal
from typing import Any, Protocol

from offload.errors import ConfigError, SerializationError


class Serializer(Protocol):
    name: str
    code: int
    #: Whether loading bytes can run code (pickle): the codec then signs every value it writes
    #: and checks that signature before loading one.
    runs_code: bool

    def dumps(self, value: Any) -> bytes: ...
    def loads(self, data: bytes) -> Any: ...


_SCALARS = frozenset({str, int, float, bool, type(None)})


def _tag(value: Any) -> Any:
    """Turn a value into plain JSON types, tagging the ones JSON cannot hold."""
    # Exact types first: the common case costs one set lookup per value.
    kind = type(value)
    if kind in _SCALARS:
        return value
    if kind is dict:
        out: dict[str, Any] = {}
        for k, v in value.items():
            if type(k) is not str and not isinstance(k, str):
                raise SerializationError(f"JSON object keys must be str, got {type(k).__name__} key {k!r}")
            out[k] = v if type(v) in _SCALARS else _tag(v)
        if len(out) == 1 and next(iter(out)).startswith("$"):
            # Escaped as key/value pairs, so a decoder meeting objects innermost first never
            # mistakes the user's object for a tag.
            return {"$map": [[k, v] for k, v in out.items()]}
        return out
    if kind is list:
        return [v if type(v) in _SCALARS else _tag(v) for v in value]
    if kind is tuple:
        return {"$tuple": [v if type(v) in _SCALARS else _tag(v) for v in value]}
    return _tag_other(value)


def _tag_other(value: Any) -> Any:
    """`_tag` for subclasses of the plain types and for the tagged types."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_tag(v) for v in value]
    if isinstance(value, dict):
        return _tag(dict(value))
    if isinstance(value, tuple):
        return {"$tuple": [_tag(v) for v in value]}
    if isinstance(value, dt.datetime):
        return {"$dt": value.isoformat()}
    if isinstance(value, dt.date):
        return {"$date": value.isoformat()}
    if isinstance(value, uuid.UUID):
        return {"$uuid": str(value)}
    if isinstance(value, Decimal):
        return {"$dec": str(value)}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$b64": base64.b64encode(bytes(value)).decode("ascii")}
    raise SerializationError(
        f"cannot serialize {type(value).__name__} with JSON "
        "(supported: None, bool, int, float, str, list, dict, tuple, datetime, date, UUID, Decimal, bytes)"
    )


# Leaf tags; "$tuple" and "$map" are handled in _untag_object itself.
_UNTAG: dict[str, Any] = {
    "$dt": dt.datetime.fromisoformat,
    "$date": dt.date.fromisoformat,
    "$uuid": uuid.UUID,
    "$dec": Decimal,
    "$b64": base64.b64decode,
}


def _untag_object(obj: dict[str, Any]) -> Any:
    """json/msgpack object hook: objects arrive innermost first, so one look at each suffices."""
    if len(obj) == 1:
        key = next(iter(obj))
        if key == "$map":
            return dict(obj[key])
        if key == "$tuple":
            return tuple(obj[key])
        convert = _UNTAG.get(key)
        if convert is not None:
            return convert(obj[key])
    return obj


def to_plain(value: Any) -> Any:
    """A JSON-compatible view of a value for browsers: datetimes as ISO strings, and so on."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, (uuid.UUID, Decimal)):
        return str(value)
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(bytes(value)).decode("ascii")
    return repr(value)


# Made once: json.dumps and json.loads with options build a new encoder or decoder per call
# (about 3 and 5 us, a good part of a small envelope's cost). Shared between threads as the json
# module shares its own default ones.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
# The parser calls the hook for each object as it builds it: no second walk in Python.
_DECODER = json.JSONDecoder(object_hook=_untag_object)


class JSONSerializer:
    name = "json"
    code = 1
    runs_code = False

    def dumps(self, value: Any) -> bytes:
        try:
            return _ENCODER.encode(_tag(value)).encode()
        except ValueError as e:  # NaN / infinity
            raise SerializationError(f"cannot serialize with JSON: {e}") from None

    def loads(self, data: bytes) -> Any:
        return _DECODER.decode(data if isinstance(data, str) else str(data, "utf-8"))


class MsgpackSerializer:
    name = "msgpack"
    code = 2
    runs_code = False

    def __init__(self) -> None:
        try:
            import msgpack
        except ImportError:
            raise ConfigError("serializer='msgpack' needs msgpack: pip install 'offload[msgpack]'") from None
        self._msgpack = msgpack

    def dumps(self, value: Any) -> bytes:
        try:
            packed: bytes = self._msgpack.packb(_tag(value), use_bin_type=True)
            return packed
        except (TypeError, ValueError) as e:
            raise SerializationError(f"cannot serialize with msgpack: {e}") from None

    def loads(self, data: bytes) -> Any:
        return self._msgpack.unpackb(data, raw=False, strict_map_key=True, object_hook=_untag_object)


class PickleSerializer:
    """Only when the app is created with serializer="pickle" and a secret: unpickling runs
    code, so the codec unpickles only bytes it signed."""

    name = "pickle"
    code = 3
    runs_code = True

    def dumps(self, value: Any) -> bytes:
        try:
            return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            raise SerializationError(f"cannot pickle: {e}") from None

    def loads(self, data: bytes) -> Any:
        return pickle.loads(data)


_BY_NAME: dict[str, type[Serializer]] = {"json": JSONSerializer, "msgpack": MsgpackSerializer, "pickle": PickleSerializer}
BY_CODE = {cls.code: cls for cls in _BY_NAME.values()}


def get_serializer(name: str) -> Serializer:
    try:
        return _BY_NAME[name]()
    except KeyError:
        raise ConfigError(f"unknown serializer {name!r}; choose one of {', '.join(_BY_NAME)}") from None
