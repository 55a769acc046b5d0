"""Task states read in batches.

When many tasks end at once, thousands of waiting requests wake in the same moment and each
wants its task's state. Asking the store once per request would be thousands of round trips
(or thread hops for sqlite); instead the reads asked for in one turn of the event loop go out as
one `Store.get_states` call, and while a call is out, the reads asked for meanwhile wait for it
and go out together next. Each state is decoded and rendered once however many clients wait on
it. A lone read goes out at once: no timer holds it back (a millisecond's window did, and it
doubled the time of a plain ``GET /tasks/{id}``).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Sequence

from offload.app import Offload
from offload.gateway.payload import Rendered, render

#: Ids per `get_states` call; keeps sqlite well under its limit of bound parameters.
BATCH = 500
#: Rendered states remembered (least recently read dropped first).
CACHE = 20_000


class StateReader:
    """Batched, rendered state reads for one event loop."""

    def __init__(self, app: Offload, debug: bool) -> None:
        self._app = app
        self._debug = debug
        self._waiting: list[tuple[Sequence[str], asyncio.Future[list[Rendered | None]]]] = []
        self._busy = False  # a batch goes out on the next turn of the loop, or is out
        self._batch: asyncio.Task[None] | None = None  # the loop keeps only a weak reference
        # The last bytes read per task and what they rendered to: a waiter woken without a
        # change (a safety re-read, a spurious signal) then costs a lookup, not a decode.
        self._rendered: OrderedDict[str, tuple[bytes, Rendered]] = OrderedDict()

    async def read(self, ids: Sequence[str]) -> list[Rendered | None]:
        """The current state of each task, None for an unknown id."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Rendered | None]] = loop.create_future()
        self._waiting.append((ids, future))
        if not self._busy:
            # The next turn, so that every request woken in this one joins; while a batch is
            # out, its end sends the next one.
            self._busy = True
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        waiting, self._waiting = self._waiting, []
        self._batch = asyncio.get_running_loop().create_task(self._fetch(waiting))
        self._batch.add_done_callback(self._fetched)

    def _fetched(self, batch: asyncio.Task[None]) -> None:
        self._batch = None
        if self._waiting:
            batch.get_loop().call_soon(self._flush)
        else:
            self._busy = False

    async def _fetch(self, waiting: list[tuple[Sequence[str], asyncio.Future[list[Rendered | None]]]]) -> None:
        ids = list(dict.fromkeys(i for wanted, _ in waiting for i in wanted))
        found: dict[str, Rendered | BaseException | None] = {}
        chunks = [ids[start : start + BATCH] for start in range(0, len(ids), BATCH)]
        results: list[list[bytes | None] | BaseException]
        try:
            store = await self._app._store()
            results = await asyncio.gather(*(store.get_states(c) for c in chunks), return_exceptions=True)
        except asyncio.CancelledError:
            for _, future in waiting:
                future.cancel()
            raise
        except Exception as e:  # no connection to the store
            results = [e] * len(chunks)
        for chunk, raws in zip(chunks, results, strict=True):
            if isinstance(raws, BaseException):
                found.update(dict.fromkeys(chunk, raws))
                continue
            for task_id, raw in zip(chunk, raws, strict=True):
                found[task_id] = self._render(task_id, raw)
        for wanted, future in waiting:
            if future.done():  # its request was cancelled (the client left)
                continue
            states = [found[i] for i in wanted]
            error = next((s for s in states if isinstance(s, BaseException)), None)
            if error is None:
                future.set_result(states)  # type: ignore[arg-type]
            elif isinstance(error, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(error)

    def rendered(self, task_id: str, raw: bytes) -> Rendered:
        """A state whose bytes the caller has already (a final state that came with its change
        signal, see `Watch.final_state`), rendered through the same cache, with no read."""
        result = self._render(task_id, raw)
        if isinstance(result, Exception):
            raise result
        assert result is not None
        return result

    def _render(self, task_id: str, raw: bytes | None) -> Rendered | Exception | None:
        if raw is None:
            self._rendered.pop(task_id, None)
            return None
        cached = self._rendered.get(task_id)
        if cached is not None and cached[0] == raw:
            self._rendered.move_to_end(task_id)
            return cached[1]
        try:
            rendered = render(self._app.decode_state(raw), self._debug)
        except Exception as e:
            return e
        self._rendered[task_id] = (raw, rendered)
        if len(self._rendered) > CACHE:
            self._rendered.popitem(last=False)
        return rendered
