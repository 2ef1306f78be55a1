"""Running a workflow with no coordinator: each step is a cast whose message carries what
follows it; the worker that ran a step publishes the next ones.

A step's message carries, in its envelope headers, ``workflow``: ``{"id", "step" (the task
node), "then" (the continuation: frames, innermost first), "nonce" (new for each
publish)}``. Frames: ``{"c": [nodes]}`` the rest of a chain; ``{"g": id, "i": index, "n":
size}`` membership of a group, whose barrier is settled in Redis
(:class:`~amqprpc.workflow.state.WorkflowState`).

Guarantees (also in docs/guides/workflows.md):
- a step runs at least once (its handler's retry policy applies; a worker killed mid-step
  gets its message redelivered and the step runs again);
- what follows a step is published only after the step succeeded, and runs once: a second
  copy of the same step -- published twice when a worker died between publishing it and
  acking its own message -- is acked unrun (its claim holds another copy's nonce);
- a chord's callback runs once: of the group's members, the one whose result completes the
  barrier (one Lua script) continues the workflow, also when its message comes again;
- a step that fails for good (after its retries) fails the workflow: nothing after it runs,
  and its dead letter is where ``amqprpc dlq`` shows it.
"""
from __future__ import annotations

import uuid
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence

from amqprpc import context
from amqprpc.workflow.state import WorkflowState

HEADER = "workflow"


class Publication(NamedTuple):
    """One step to cast: where, with what, and its workflow header."""

    service: str
    action: str
    payload: Any
    options: Mapping[str, Any]
    header: Dict[str, Any]


def plan(state: WorkflowState, workflow: str, node: Mapping[str, Any], given: Any,
         then: Sequence[Mapping[str, Any]]) -> List[Publication]:
    """The casts that start ``node`` with ``given`` as the previous result (an empty group
    settles at once, and what follows it is planned instead)."""
    kind = node["k"]
    if kind == "t":
        payload = node["p"] if "p" in node else as_payload(given)
        header = {"id": workflow, "step": {key: node[key] for key in ("id", "s", "a")}, "then": list(then),
                  "nonce": uuid.uuid4().hex}
        return [Publication(node["s"], node["a"], payload, node.get("o") or {}, header)]
    steps = node["n"]
    if kind == "c":
        rest = [{"c": steps[1:]}] if len(steps) > 1 else []
        return plan(state, workflow, steps[0], given, [*rest, *then])
    if not steps:  # an empty group: its result is [] at once
        return advance(state, workflow, then, [])
    return [publication for index, step in enumerate(steps)
            for publication in plan(state, workflow, step, given,
                                    [{"g": node["id"], "i": index, "n": len(steps)}, *then])]


def as_payload(result: Any) -> Any:
    """The result rule: what a step given no payload receives. The previous result when it
    is a JSON object; ``{"result": <it>}`` otherwise (a group's list, a number, a string);
    ``{}`` for the first step."""
    if result is None:
        return {}
    return result if isinstance(result, dict) else {"result": result}


def advance(state: WorkflowState, workflow: str, then: Sequence[Mapping[str, Any]], result: Any,
            ended: Optional[List[bool]] = None) -> List[Publication]:
    """After a step returned ``result``: the casts of what follows (none while a group
    waits for other members; none when the workflow ended, its result stored -- then
    ``ended`` gets True appended)."""
    if not then:
        finished = state.finish(workflow, result)
        if ended is not None and finished:
            ended.append(True)
        return []
    frame, rest = then[0], then[1:]
    if "c" in frame:
        steps = frame["c"]
        return plan(state, workflow, steps[0], result, [*([{"c": steps[1:]}] if len(steps) > 1 else []), *rest])
    results = state.settle(workflow, frame["g"], frame["i"], frame["n"], result)
    return [] if results is None else advance(state, workflow, rest, results, ended)


def publish(client: Any, publications: Sequence[Publication], cast: Optional[Callable[..., Any]] = None) -> None:
    """Cast each step (confirmed), its workflow header in the envelope and the workflow's
    id as the trace id of every step (one trace for the whole workflow)."""
    cast = cast or client.cast
    for publication in publications:
        extra = {HEADER: publication.header, "trace_id": publication.header["id"]}
        token = context.outgoing_headers.set(extra)
        try:
            cast(publication.service, publication.action, publication.payload, **publication.options)
        finally:
            context.outgoing_headers.reset(token)
