"""The codec refuses an envelope whose fields have the wrong type or range, naming the field."""

from __future__ import annotations

import json
from typing import Any

import pytest

from offload.errors import MessageError
from offload.message import MAGIC, VERSION, Codec, Envelope
from offload.serializers import JSONSerializer
from offload.worker.outcome import MAX_BACKOFF_S, backoff_delay
from tests.test_poison import POISON

CODEC = Codec(JSONSerializer())


def _decode(fields: dict[str, Any]) -> Envelope:
    return CODEC.decode(MAGIC + bytes((VERSION, JSONSerializer.code)) + json.dumps(fields, allow_nan=True).encode())


def _valid() -> dict[str, Any]:
    return Envelope(id="t1", name="tasks.add", args=(1, 2), eta=1.0, expires=2.0, retries=1, retry_backoff=0.5,
                    time_limit=3.0, soft_time_limit=2, key="k", headers={"owner": "u"}).to_dict()


def test_every_field_of_a_valid_envelope_comes_back() -> None:
    fields = _valid()
    assert _decode(fields) == Envelope(**{**fields, "args": (1, 2)})


@pytest.mark.parametrize(("name", "value"), POISON)
def test_a_field_of_the_wrong_type_or_range_is_refused_by_name(name: str, value: Any) -> None:
    with pytest.raises(MessageError, match=f"^bad envelope field '{name}': expected "):
        _decode({**_valid(), name: value})


def test_an_envelope_without_an_id_is_refused() -> None:
    fields = _valid()
    del fields["id"]
    with pytest.raises(MessageError, match="no id"):
        _decode(fields)


def test_unknown_fields_are_ignored() -> None:
    assert _decode({**_valid(), "from_a_newer_sender": 1}).id == "t1"


def test_the_backoff_of_a_huge_attempt_is_the_ceiling() -> None:
    assert MAX_BACKOFF_S / 2 <= backoff_delay(10**6, 1.0) <= MAX_BACKOFF_S
