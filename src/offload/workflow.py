"""Workflows: ``group``, ``chain``, ``chord`` and ``race``, built from signatures and nested freely.

There is no coordinator process. Each workflow node (the workflow and every workflow nested in
it) has an id and a `TaskState` in the result store like any task, holding in ``meta`` its kind
and the specs of its children (with their ids, assigned when the workflow is sent). Task members
are ordinary messages whose headers name their parent node (``parent``) and their slot in it
(``slot``: the parent's kind, the member's index, the number of members).

When a member reaches a final state, `on_outcome` runs on the worker that stored it (an
`Offload.outcome_hooks` entry, called before the message is acknowledged) and moves the parent
on: a chain enqueues its next step with the result as first argument; a group counts its ended
members and, when the last one ends, stores its own outcome; a race ends with its first success
and cancels the rest. A node that ends tells its own parent the same way, so nesting needs no
special case. Nothing is kept in worker memory, so a worker can die or restart midway: its
message is delivered again, the member runs again, and the hook runs again.

Every step that must happen once is guarded in the store, so a redelivery or two members ending
at the same instant on two workers cannot do it twice:

* a member is counted once (``set_if_absent`` on a per-member key, then ``incr``); the member
  whose count reaches the total is the one that concludes the node;
* a node ends once and a chain step is started once: the first caller claims a key
  (``set_if_absent``) with its own id as the value. The same member coming back (its message
  delivered again because the worker died after the claim) may finish the job; anyone else
  backs off.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from offload.errors import ConfigError, NotAWorkflow
from offload.message import Envelope, new_task_id
from offload.result import Result, Status, TaskState, wait_states
from offload.task import Signature

if TYPE_CHECKING:
    from offload.app import Offload

Kind = Literal["group", "chain", "chord", "race"]
#: Kinds that run their children one after another, each result feeding the next.
_SEQUENTIAL = ("chain", "chord")


@dataclass(frozen=True, slots=True)
class Workflow:
    """A workflow not yet sent. ``delay()``/``adelay()`` send it and return a `WorkflowResult`."""

    app: Offload
    kind: Kind
    members: tuple[Signature | Workflow, ...]

    def delay(self) -> WorkflowResult:
        return self.app._portal.run(self.adelay())

    async def adelay(self) -> WorkflowResult:
        spec = _compile(self)
        await _start(self.app, spec, None, ())
        return WorkflowResult(self.app, spec["id"])


def _members(kind: str, given: Sequence[Any]) -> tuple[Signature | Workflow, ...]:
    # group(a, b) and group([a, b]) both read naturally; accept both.
    if len(given) == 1 and not isinstance(given[0], (Signature, Workflow)) and isinstance(given[0], Iterable):
        given = tuple(given[0])
    members = tuple(given)
    if not members:
        raise ConfigError(f"{kind}() needs at least one member")
    for m in members:
        if not isinstance(m, (Signature, Workflow)):
            raise ConfigError(f"{kind}() members are signatures (task.s(...)) or workflows, got {m!r}")
    apps = {id(m.app) for m in members}
    if len(apps) > 1:
        raise ConfigError(f"{kind}() members belong to different apps")
    return members


def group(*members: Any) -> Workflow:
    """Run the members in parallel; the result is the list of their results, in order."""
    ms = _members("group", members)
    return Workflow(ms[0].app, "group", ms)


def chain(*members: Any) -> Workflow:
    """Run the members one after another; each result is the next member's first argument."""
    ms = _members("chain", members)
    return Workflow(ms[0].app, "chain", ms)


def chord(header: Iterable[Signature | Workflow], callback: Signature | Workflow) -> Workflow:
    """Run ``header`` as a group, then ``callback`` once with the list of its results."""
    body = group(*_members("chord", tuple(header)))
    (cb,) = _members("chord", (callback,))
    return Workflow(body.app, "chord", (body, cb))


def race(*members: Any) -> Workflow:
    """Run the members in parallel; the first to succeed wins and the rest are cancelled. When
    all fail, the last failure is the race's."""
    ms = _members("race", members)
    return Workflow(ms[0].app, "race", ms)


# -- specs: what is stored ---------------------------------------------------------------------
# A task spec is {"id", "task": Signature.to_dict()}; a workflow spec is {"id", "kind", "children"}.
# Specs are plain data so that any process (a worker, a web process rebuilding a handle) can
# continue a workflow from the store alone.


def _compile(node: Signature | Workflow) -> dict[str, Any]:
    if isinstance(node, Signature):
        return {"id": new_task_id(), "task": node.to_dict()}
    return {"id": new_task_id(), "kind": node.kind, "children": [_compile(m) for m in node.members]}


def _slot(kind: str, index: int, n: int) -> dict[str, Any]:
    return {"kind": kind, "index": index, "n": n}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


async def _start(app: Offload, spec: dict[str, Any], parent: tuple[str, dict[str, Any]] | None, lead: tuple[Any, ...]) -> None:
    """Send a node: enqueue a task, or store a workflow's state and start its first children.
    ``lead`` is prepended to a task's arguments (the previous chain step's result)."""
    if "task" in spec:
        sig = Signature.from_dict(app, spec["task"])
        headers = {} if parent is None else {"parent": parent[0], "slot": parent[1]}
        env = app.build(sig.name, (*lead, *sig.args), sig.kwargs, sig.opts.merge(headers=headers), task_id=spec["id"])
        await app.enqueue_envelope(env)
        return
    kind, children = spec["kind"], spec["children"]
    meta: dict[str, Any] = {"workflow": kind, "children": children}
    if parent is not None:
        meta.update(parent=parent[0], slot=parent[1])
    now = _now()
    # Stored before any child is sent, so no child can end before its parent exists, and a
    # handle returned by delay() always finds its state.
    state = TaskState(id=spec["id"], name=f"offload.{kind}", status=Status.STARTED, queued_at=now, started_at=now, meta=meta)
    await app._write_states([state])
    starting = children[:1] if kind in _SEQUENTIAL else children
    for i, child in enumerate(starting):
        await _start(app, child, (spec["id"], _slot(kind, i, len(children))), lead)


# -- moving a workflow on when a member ends ----------------------------------------------------


async def on_outcome(app: Offload, env: Envelope, state: TaskState) -> None:
    """`Offload.outcome_hooks` entry: a message with a ``parent`` header reached a final state."""
    parent = env.headers.get("parent")
    if isinstance(parent, str) and state.done:
        slot = env.headers.get("slot")
        await _member_ended(app, parent, slot if isinstance(slot, dict) else None, state)


async def _member_ended(app: Offload, parent_id: str, slot: dict[str, Any] | None, member: TaskState) -> None:
    if slot is None:  # ended outside a worker (cancelled while queued): find its place
        slot = await _find_slot(app, parent_id, member.id)
        if slot is None:
            return
    kind, index, n = slot["kind"], int(slot["index"]), int(slot["n"])
    if kind in _SEQUENTIAL:
        if member.status is not Status.SUCCEEDED:
            await _end(app, parent_id, member.id, _failure(member))
        elif index == n - 1:
            await _end(app, parent_id, member.id, {"status": Status.SUCCEEDED, "result": member.result})
        else:
            await _advance(app, parent_id, index, member)
    elif kind == "race" and member.status is Status.SUCCEEDED:
        if await _end(app, parent_id, member.id, {"status": Status.SUCCEEDED, "result": member.result}):
            await _cancel_children(app, parent_id, keep=member.id)
    elif await _count(app, parent_id, index, n):  # a group's member, or a race's failure
        await _conclude(app, parent_id, member.id)


async def _find_slot(app: Offload, parent_id: str, member_id: str) -> dict[str, Any] | None:
    parent = await app._read_state(parent_id)
    if parent is None or "workflow" not in parent.meta:
        return None
    ids = [c["id"] for c in parent.meta["children"]]
    if member_id not in ids:
        return None
    return _slot(parent.meta["workflow"], ids.index(member_id), len(ids))


def _failure(member: TaskState) -> dict[str, Any]:
    # The node ends the way its member did (failed, cancelled, expired), so get() raises the
    # same kind of error with the member's type, message and traceback.
    return {"status": member.status, "error": member.error}


async def _claim(app: Offload, key: str, owner: str) -> Literal["won", "mine", "theirs"]:
    """Take a once-only step. "mine" means this owner took it before (its message is being
    delivered again): it may redo the step's idempotent parts."""
    store = await app._store()
    if await store.set_if_absent(key, owner.encode(), app.result_ttl_s):
        return "won"
    return "mine" if await store.get_value(key) == owner.encode() else "theirs"


async def _count(app: Offload, node_id: str, index: int, n: int) -> bool:
    """Count an ended member once; True for the member that completes the count."""
    store = await app._store()
    ttl = app.result_ttl_s
    if await store.set_if_absent(f"wf:{node_id}:ended:{index}", b"1", ttl):
        return await store.incr(f"wf:{node_id}:ended", 1, ttl) >= n
    # Counted before, by an earlier delivery of this member that may have died before or after
    # its incr: decide from the members' states instead.
    node = await app._read_state(node_id)
    if node is None:
        return False
    states = await app._read_states([c["id"] for c in node.meta["children"]])
    return all(s is not None and s.done for s in states)


async def _conclude(app: Offload, node_id: str, owner: str) -> None:
    """Every member of a group (or race) has ended: store the node's outcome."""
    node = await app._read_state(node_id)
    if node is None:
        return
    states = await app._read_states([c["id"] for c in node.meta["children"]])
    if not all(s is not None and s.done for s in states):
        return
    ended: list[TaskState] = [s for s in states if s is not None]
    failures = [s for s in ended if s.status is not Status.SUCCEEDED]
    if node.meta["workflow"] == "race":
        wins = [s for s in ended if s.status is Status.SUCCEEDED]
        if wins:  # only when a success's own hook never ran to the end
            first = min(wins, key=lambda s: s.finished_at or _now())
            outcome = {"status": Status.SUCCEEDED, "result": first.result}
        else:
            outcome = _failure(max(failures, key=lambda s: s.finished_at or _now()))
    elif failures:
        outcome = _failure(failures[0])  # the first in member order, whatever ended first
    else:
        outcome = {"status": Status.SUCCEEDED, "result": [s.result for s in ended]}
    await _end(app, node_id, owner, outcome)


async def _end(app: Offload, node_id: str, owner: str, outcome: dict[str, Any]) -> bool:
    """Store a node's final state once, then tell its parent. True if this call ended it."""
    claim = await _claim(app, f"wf:{node_id}:end", owner)
    if claim == "theirs":
        return False
    node = await app._read_state(node_id)
    if node is None:
        return False
    if not node.done:
        node.status = outcome["status"]
        node.result = outcome.get("result")
        node.error = outcome.get("error")
        node.finished_at = _now()
        await app._write_states([node])
    parent = node.meta.get("parent")
    if isinstance(parent, str):
        await _member_ended(app, parent, node.meta.get("slot"), node)
    return True


async def _advance(app: Offload, chain_id: str, index: int, member: TaskState) -> None:
    """A chain step succeeded: start the next one with its result as the first argument."""
    claim = await _claim(app, f"wf:{chain_id}:next:{index}", member.id)
    if claim == "theirs":
        return
    node = await app._read_state(chain_id)
    if node is None or node.done:  # cancelled meanwhile: stop here
        return
    children = node.meta["children"]
    following = children[index + 1]
    if claim == "mine" and await app._read_state(following["id"]) is not None:
        return  # an earlier delivery of this step already started it
    await _start(app, following, (chain_id, _slot(node.meta["workflow"], index + 1, len(children))), (member.result,))


# -- cancelling ----------------------------------------------------------------------------------


async def cancel(app: Offload, node_id: str) -> None:
    """Cancel a workflow node: it ends as cancelled and whatever runs under it is cancelled.
    A task id is cancelled the ordinary way."""
    node = await app._read_state(node_id)
    if node is None or "workflow" not in node.meta:
        await app._cancel(node_id)
        return
    await _end(app, node_id, "cancel", {"status": Status.CANCELLED})
    await _cancel_children(app, node_id)


async def _cancel_children(app: Offload, node_id: str, keep: str | None = None) -> None:
    node = await app._read_state(node_id)
    if node is None:
        return
    ids = [c["id"] for c in node.meta["children"] if c["id"] != keep]
    for child_id, state in zip(ids, await app._read_states(ids), strict=True):
        if state is not None and not state.done:  # None: a chain step never started
            await cancel(app, child_id)


# -- handles -------------------------------------------------------------------------------------


class WorkflowResult(Result[Any]):
    """A handle on a workflow: ``get()``, ``await``, ``state()``, ``cancel()`` like a `Result`,
    plus ``get(return_exceptions=True)`` for groups and ``children()``.

    ``app.workflow(id)`` rebuilds one from an id in any process; ``app.result(id)`` works for a
    workflow id too, as a plain `Result` (its value, state and errors, without cancelling the
    members)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"<WorkflowResult {self.id}>"

    async def wait(self, timeout: float | None = None, *, return_exceptions: bool = False) -> Any:
        """The workflow's value, or the error it ended with. With ``return_exceptions`` a
        group's failed members come back as error values (`TaskFailed`, ...) in their place."""
        [state] = await wait_states(self.app, [self.id], timeout, mode="all")
        if return_exceptions and state.meta.get("workflow") == "group":
            members = await self.app._read_states([c["id"] for c in state.meta["children"]])
            # Members still running belong to a group cancelled as a whole: that is its outcome.
            if all(m is not None and m.done for m in members):
                return [m.result if m.status is Status.SUCCEEDED else m.error_object() for m in members if m is not None]
        return state.outcome()

    def get(self, timeout: float | None = None, *, return_exceptions: bool = False) -> Any:
        return self.app._portal.run(self.wait(timeout, return_exceptions=return_exceptions))

    async def acancel(self) -> None:
        await cancel(self.app, self.id)

    async def achildren(self) -> list[Result[Any]]:
        """Handles on the members, in order (a chain's later steps may not have started yet)."""
        state = await self.astate()
        if "workflow" not in state.meta:
            raise NotAWorkflow(f"{self.id!r} is a task, not a workflow")
        return [
            WorkflowResult(self.app, c["id"]) if "kind" in c else Result(self.app, c["id"])
            for c in state.meta["children"]
        ]

    def children(self) -> list[Result[Any]]:
        return self.app._portal.run(self.achildren())
