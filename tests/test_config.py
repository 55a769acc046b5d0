"""App configuration: URLs, environment, namespaces, unreachable brokers."""

from __future__ import annotations

import time

import pytest

from offload import BrokerUnavailable, ConfigError, Offload
from offload.config import mask_url, parse_url


def test_defaults_come_from_the_environment_once(monkeypatch: pytest.MonkeyPatch) -> None:
    app = Offload()
    assert app.url.raw == "sqlite:///offload.db" and app.namespace == "default"
    monkeypatch.setenv("OFFLOAD_URL", "memory://envtest")
    monkeypatch.setenv("OFFLOAD_NAMESPACE", "stage")
    app = Offload()
    assert app.url.raw == "memory://envtest" and app.namespace == "stage"


def test_password_needing_percent_encoding_gets_an_exact_hint() -> None:
    with pytest.raises(ConfigError) as info:
        Offload("redis://user:p@ss/w0rd@localhost:6379/0")
    message = str(info.value)
    assert "'/' -> %2F" in message and "'@' -> %40" in message
    assert 'urllib.parse.quote(password, safe="")' in message
    assert "p@ss" not in message and "w0rd" not in message


def test_encoded_password_is_decoded() -> None:
    url = parse_url("redis://user:p%40ss%2Fw0rd@localhost:6379/0")
    assert (url.username, url.password, url.host, url.port) == ("user", "p@ss/w0rd", "localhost", 6379)


def test_masking() -> None:
    assert mask_url("amqp://guest:secret@host:5672/vh") == "amqp://guest:***@host:5672/vh"
    assert mask_url("redis://host:6379/0") == "redis://host:6379/0"


def test_amqp_without_results_says_what_to_add() -> None:
    with pytest.raises(ConfigError, match="results='redis://"):
        Offload("amqp://guest:guest@localhost:5672/")


@pytest.mark.parametrize("url", ["nope", "ftp://x", "redis://localhost:notaport/0"])
def test_bad_urls(url: str) -> None:
    with pytest.raises(ConfigError):
        app = Offload(url)
        app._portal.run(app._backends())


def test_bad_namespace() -> None:
    with pytest.raises(ConfigError, match="namespace"):
        Offload("memory://", namespace="a b")


@pytest.mark.parametrize("url", ["redis://u:topsecret@127.0.0.1:1/0", "amqp://u:topsecret@127.0.0.1:1/"])
def test_unreachable_broker_is_broker_unavailable_with_masked_password(url: str) -> None:
    results = "redis://u:topsecret@127.0.0.1:1/0" if url.startswith("amqp") else None
    app = Offload(url, results=results)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable) as info:
        app.ref("x").delay()
    assert time.monotonic() - started < 30
    assert "topsecret" not in str(info.value) and "***" in str(info.value)
    app.close()
