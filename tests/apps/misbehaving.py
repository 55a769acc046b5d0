"""An app whose parts misbehave the way real ones can, run by real worker processes: an
admission hook that raises, a thread task stuck in a C call that no time limit interrupts.
Its broker comes from the environment, as for tests.apps.basic."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

from offload import Offload

app = Offload(results=os.environ.get("OFFLOAD_TEST_RESULTS") or None)

BROKEN_BY_HOOK = "tests.apps.misbehaving.broken_by_hook"


async def broken_admission(env: Any, task: Any) -> float | None:
    if env.name == BROKEN_BY_HOOK:
        raise RuntimeError("the admission hook is broken")
    return None


app.admission_hooks.append(broken_admission)


@app.task(name=BROKEN_BY_HOOK)
def broken_by_hook() -> str:
    return "ran"


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task(time_limit=1.0)
def stuck_in_c(marker: str) -> None:
    """Blocks in libc's sleep(3): the time limit's exception, raised at the thread's next
    bytecode, never lands while the call lasts."""
    Path(marker).write_text(str(os.getpid()))
    ctypes.CDLL(None).sleep(3600)
