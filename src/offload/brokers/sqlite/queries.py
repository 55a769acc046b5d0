"""The SQL of the sqlite backend, read once from ``queries.sql`` (shipped beside this module).

Each ``-- name: <name>`` section of the file is one constant here, its name in capitals; the
schema is `SCHEMA`, its statements in order. Statements whose shape depends on how many rows
or queues a call has are built here from their named query and cached: `insert_rows`,
`put_states_rows`, `claim` and `due_within`.
"""

from __future__ import annotations

import functools
import re
import sqlite3
from importlib import resources
from typing import NamedTuple

__all__ = [
    "ROWS_PER_INSERT",
    "SCHEMA",
    "STATES_PER_STATEMENT",
    "STATE_COLUMNS",
    "Claim",
    "claim",
    "due_within",
    "history",
    "insert_rows",
    "put_states_rows",
]  # fmt: skip

ROWS_PER_INSERT = 100  # messages in one INSERT at most
STATES_PER_STATEMENT = 100  # task states in one INSERT at most
STATE_COLUMNS = 8  # the parameters of one state in PUT_STATES

_PACKAGE = __name__.rpartition(".")[0]
_SECTION = re.compile(r"^-- name: (\w+)\s*$")
_VALUES = re.compile(r"VALUES (\([?, ]+\))")


def _load() -> dict[str, str]:
    text = resources.files(_PACKAGE).joinpath("queries.sql").read_text(encoding="utf-8")
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if match := _SECTION.match(line):
            current = sections.setdefault(match[1], [])
        elif current is not None and not line.lstrip().startswith("--"):
            current.append(line)
    return {name: "\n".join(lines).strip() for name, lines in sections.items()}


def _statements(script: str) -> tuple[str, ...]:
    out: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            out.append(pending.strip().removesuffix(";"))
            pending = ""
    if pending.strip():
        raise ValueError(f"queries.sql: the schema ends in an unfinished statement: {pending.strip()[:60]!r}")
    return tuple(out)


_sql = _load()

SCHEMA = _statements(_sql["schema"])

INSERT = _sql["insert"]
KEY_HOLDER = _sql["key_holder"]
UNCLAIM = _sql["unclaim"]
ACK = _sql["ack"]
ACK_MANY = _sql["ack_many"]
REQUEUE = _sql["requeue"]
EXTEND = _sql["extend"]
BURY = _sql["bury"]

DEAD_LETTERS = _sql["dead_letters"]
REPLAY_ALL = _sql["replay_all"]
REPLAY_ONE = _sql["replay_one"]
CANCEL = _sql["cancel"]
PURGE = _sql["purge"]
COUNT_QUEUED = _sql["count_queued"]
COUNT_SCHEDULED_AND_RUNNING = _sql["count_scheduled_and_running"]
COUNT_DEAD = _sql["count_dead"]
FLUSH_MESSAGES = _sql["flush_messages"]
FLUSH_DEAD_LETTERS = _sql["flush_dead_letters"]

PUT_STATES = _sql["put_states"]
PUT_STATE_IF_ABSENT = _sql["put_state_if_absent"]
GET_STATE = _sql["get_state"]
GET_STATES = _sql["get_states"]
FLUSH_STATES = _sql["flush_states"]

PUBLISH = _sql["publish"]
LAST_EVENT_SEQ = _sql["last_event_seq"]
READ_EVENTS = _sql["read_events"]
FLUSH_EVENTS = _sql["flush_events"]

SET_IF_ABSENT = _sql["set_if_absent"]
GET_VALUE = _sql["get_value"]
SET_VALUE = _sql["set_value"]
DELETE_VALUE = _sql["delete_value"]
LIVE_VALUES_IN_RANGE = _sql["live_values_in_range"]
FLUSH_VALUES = _sql["flush_values"]

PRUNE_STATES = _sql["prune_states"]
PRUNE_VALUES = _sql["prune_values"]
PRUNE_EVENTS = _sql["prune_events"]


def _repeat_values(sql: str, n_rows: int) -> str:
    # Many rows in one statement: one commit, one trip through the GIL for the batch.
    return _VALUES.sub(lambda m: "VALUES " + ", ".join([m[1]] * n_rows), sql, count=1)


@functools.lru_cache(maxsize=ROWS_PER_INSERT)
def insert_rows(n_rows: int) -> str:
    """`INSERT` for this many messages."""
    return _repeat_values(INSERT, n_rows)


@functools.lru_cache(maxsize=STATES_PER_STATEMENT)
def put_states_rows(n_rows: int) -> str:
    """`PUT_STATES` for this many states."""
    return _repeat_values(PUT_STATES, n_rows)


class Claim(NamedTuple):
    """The statements of a fetch from some number of queues (see queries.sql)."""

    promote: str
    claim: str
    claimed: str
    next_due: str


@functools.lru_cache(maxsize=64)
def claim(n_queues: int) -> Claim:
    """The statements of a fetch from this many queues."""
    marks = ", ".join("?" * n_queues)
    candidates = " UNION ALL ".join(_sql["claim_candidates"].format(rank=i) for i in range(n_queues))
    dues = " UNION ALL ".join([_sql["queue_due"]] * n_queues)
    return Claim(
        promote=_sql["promote"].format(queues=marks),
        claim=_sql["claim"].format(candidates=candidates),
        claimed=_sql["claimed"].format(queues=marks),
        next_due=_sql["next_due"].format(dues=dues),
    )


@functools.lru_cache(maxsize=8)
def history(filters: tuple[str, ...]) -> str:
    """A history page with an equality test on each of these columns (status, name, queue),
    whose values follow the namespace in the parameters."""
    return _sql["history"].format(filters="".join(f" AND {column} = ?" for column in filters))


@functools.lru_cache(maxsize=64)
def due_within(n_queues: int) -> str:
    """`due_within` for this many queues."""
    return _sql["due_within"].format(queues=", ".join("?" * n_queues))
