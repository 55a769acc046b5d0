"""URL parameters: each kind of backend accepts the ones it reads and refuses any other at
Offload(...), naming the ones it knows, with the URL's password masked."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from offload import ConfigError, Offload
from offload.brokers import URL_PARAMS

SRC = Path(__file__).resolve().parent.parent / "src" / "offload" / "brokers"

BASE = {
    "memory": "memory://params",
    "sqlite": "sqlite:///{tmp}/offload.db",
    "redis": "redis://:s3cret-pw@127.0.0.1:6379/0",
    "rediss": "rediss://:s3cret-pw@127.0.0.1:6380/0",
    "amqp": "amqp://guest:s3cret-pw@127.0.0.1:5672/",
    "amqps": "amqps://guest:s3cret-pw@127.0.0.1:5671/",
}
# What docs/brokers.md documents and tests, examples and benchmarks use, written out here so
# that the table in offload.brokers cannot lose one unnoticed.
DOCUMENTED = {
    "memory": {"visibility_timeout": "3"},
    "sqlite": {"visibility_timeout": "3"},
    "redis": {"visibility_timeout": "3", "max_connections": "8"},
    "rediss": {"visibility_timeout": "3", "max_connections": "8", "ssl_cert_reqs": "none", "ssl_ca_certs": "/ca.pem"},
    "amqp": {"connect_timeout": "1", "publish_timeout": "5", "prefetch": "10"},
    "amqps": {"connect_timeout": "1", "cafile": "/ca.pem", "certfile": "/c.pem", "keyfile": "/k.pem"},
}
# A kind whose results live elsewhere needs results=.
RESULTS = {"amqp": "redis://127.0.0.1:6379/0", "amqps": "redis://127.0.0.1:6379/0"}


def url_of(kind: str, tmp_path: Path, query: str) -> str:
    return BASE[kind].format(tmp=tmp_path) + "?" + query


@pytest.mark.parametrize("kind", list(BASE))
def test_every_documented_parameter_is_accepted(kind: str, tmp_path: Path) -> None:
    query = "&".join(f"{k}={v}" for k, v in DOCUMENTED[kind].items())
    app = Offload(url_of(kind, tmp_path, query), results=RESULTS.get(kind))
    assert app.url.params == DOCUMENTED[kind]


@pytest.mark.parametrize("kind", list(BASE))
def test_a_misspelt_parameter_is_refused_naming_the_known_ones(kind: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown URL parameter visibilty_timeout in .*accepts ") as info:
        Offload(url_of(kind, tmp_path, "visibilty_timeout=5"), results=RESULTS.get(kind))
    message = str(info.value)
    assert all(name in message for name in DOCUMENTED[kind])
    assert "s3cret-pw" not in message
    assert "\n" not in message


def test_a_parameter_not_read_yet_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"unknown URL parameter queue_type in amqp://guest:\*\*\*@127\.0\.0\.1:5672/\?queue_type=quorum"):
        Offload("amqp://guest:s3cret-pw@127.0.0.1:5672/?queue_type=quorum", results="redis://127.0.0.1:6379/0")


def test_amqp_has_no_leases_and_says_so_by_refusing_visibility_timeout() -> None:
    with pytest.raises(ConfigError, match="unknown URL parameter visibility_timeout"):
        Offload("amqp://guest:guest@127.0.0.1:5672/?visibility_timeout=30", results="redis://127.0.0.1:6379/0")


def test_ssl_parameters_are_refused_on_a_plain_connection() -> None:
    with pytest.raises(ConfigError, match="unknown URL parameter ssl_ca_certs"):
        Offload("redis://127.0.0.1:6379/0?ssl_ca_certs=/ca.pem")


def test_the_results_url_is_checked_too() -> None:
    with pytest.raises(ConfigError, match=r"unknown URL parameters max_conections, visibilty_timeout in redis://"):
        Offload("amqp://guest:guest@127.0.0.1:5672/", results="redis://127.0.0.1:6379/0?visibilty_timeout=5&max_conections=2")


_READS = re.compile(r"""param_float\(\s*"(\w+)"|params\.get\(\s*"(\w+)"|params\[\s*"(\w+)"\s*\]|"(\w+)"\s+in\s+url\.params""")
# Where each backend reads its URL parameters: base.py's lease, read by every broker, is declared
# for the kinds that have leases; a package is read whole, every module of it.
_MODULES_OF = {"base.py": set(BASE), "redis": {"redis", "rediss"}, "amqp": {"amqp", "amqps"}, "sqlite": {"sqlite"}}


def _source(name: str) -> str:
    path = SRC / name
    return "\n".join(p.read_text() for p in sorted(path.rglob("*.py"))) if path.is_dir() else path.read_text()


@pytest.mark.parametrize("module", sorted(_MODULES_OF))
def test_every_parameter_a_backend_reads_is_declared(module: str) -> None:
    read = {next(g for g in m.groups() if g) for m in _READS.finditer(_source(module))}
    if module == "sqlite":  # it reads only the lease, in base.py
        assert not read, read
        return
    assert read, f"no parameter reads found in {module}: the pattern no longer matches its code"
    declared = set().union(*(URL_PARAMS[kind] for kind in _MODULES_OF[module]))
    assert read <= declared
