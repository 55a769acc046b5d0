"""A short, readable text of a task call (``resize('a.jpg', width=800)``) for the dashboard.

It is kept in the task's state from the moment it is queued, because the message that holds
the arguments is gone once a worker has acked it. `reprlib` bounds each part, so a call with a
5 MB string argument costs a few hundred bytes in the state, not 5 MB.
"""

from __future__ import annotations

import reprlib
from collections.abc import Mapping, Sequence
from typing import Any

#: The longest preview kept, in characters.
MAX_CALL_PREVIEW = 1000

_repr = reprlib.Repr()
_repr.maxstring = 120
_repr.maxother = 120
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 10
_repr.maxlevel = 3


def call_preview(name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
    """``name(args..., key=value...)``, each value shortened, the whole at most `MAX_CALL_PREVIEW`."""
    short_name = name.rsplit(".", 1)[-1]
    parts = [_repr.repr(a) for a in args] + [f"{k}={_repr.repr(v)}" for k, v in kwargs.items()]
    text = f"{short_name}({', '.join(parts)})"
    return text if len(text) <= MAX_CALL_PREVIEW else text[: MAX_CALL_PREVIEW - 4] + "...)"
