"""The message codec: serializers, compression, signatures."""

from __future__ import annotations

import datetime as dt
import decimal
import uuid

import pytest

from offload import Offload, SerializationError
from offload.errors import ConfigError, MessageError, SignatureError
from offload.message import Codec, Envelope
from offload.serializers import get_serializer

VALUE = {
    "when": dt.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=dt.UTC),
    "day": dt.date(2026, 1, 2),
    "id": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "price": decimal.Decimal("19.99"),
    "blob": b"\x00\x01\xff",
    "pair": (1, ("nested", 2.5)),
    "list": [None, True, "x"],
    "$looks_like_a_tag": {"$dt": "not a date"},
}


@pytest.mark.parametrize("name", ["json", "msgpack", "pickle"])
def test_extra_types_round_trip(name: str) -> None:
    s = get_serializer(name)
    assert s.loads(s.dumps(VALUE)) == VALUE


def test_json_refuses_what_it_cannot_carry() -> None:
    s = get_serializer("json")
    with pytest.raises(SerializationError, match="set"):
        s.dumps({1, 2})
    with pytest.raises(SerializationError, match="keys must be str"):
        s.dumps({1: "a"})
    with pytest.raises(SerializationError):
        s.dumps(float("nan"))


def test_unknown_serializer_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="json, msgpack, pickle"):
        Offload("memory://", serializer="yaml")


def env(**kw: object) -> Envelope:
    return Envelope(id="abc", name="pkg.task", args=(1, "two"), kwargs={"k": VALUE}, queued_at=1.5, **kw)  # type: ignore[arg-type]


def test_envelope_round_trip_and_compression() -> None:
    codec = Codec(get_serializer("json"), compress_over=64)
    big = Envelope(id="big", name="t", args=("x" * 10_000,))
    data = codec.encode(big)
    assert len(data) < 1_000  # compressed
    assert codec.decode(data) == big
    assert codec.decode(codec.encode(env())) == env()


def test_signed_messages_verify_and_tampering_is_caught() -> None:
    codec = Codec(get_serializer("json"), secret=b"k1")
    data = codec.encode(env())
    assert codec.decode(data) == env()
    for i in (3, 10, len(data) - 1):  # the header, the digest, the payload
        tampered = bytearray(data)
        tampered[i] ^= 0x01
        with pytest.raises(MessageError):
            codec.decode(bytes(tampered))
    with pytest.raises(SignatureError, match="bad signature"):
        Codec(get_serializer("json"), secret=b"other").decode(data)
    with pytest.raises(SignatureError, match="unsigned message refused"):
        codec.decode(Codec(get_serializer("json")).encode(env()))


def test_a_message_claiming_pickle_is_never_unpickled_by_a_json_app() -> None:
    pickled = Codec(get_serializer("pickle"), secret=b"k1").encode(env())
    with pytest.raises(MessageError, match="uses serializer 'pickle'"):
        Codec(get_serializer("json"), secret=b"k1").decode(pickled)


@pytest.mark.parametrize("garbage", [b"", b"OF", b"hello world", b"OF\x01\x01{not json", b"OF\x09\x01{}", b"OF\x01\x01[1,2]", b"OF\x01\x01\xff\xfe"])
def test_garbage_is_a_message_error(garbage: bytes) -> None:
    with pytest.raises(MessageError):
        Codec(get_serializer("json")).decode(garbage)
