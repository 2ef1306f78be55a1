"""Workflows as data: :func:`task`, :func:`chain`, :func:`group` and :func:`chord`.

A workflow is a tree of steps. Each node has an id (its path in the tree: ``"0"``,
``"1.2"``...) and travels as plain JSON, so what follows a step can ride in the step's own
message (:mod:`amqprpc.workflow.runner`): no coordinator daemon.

The result rule: a step given no payload receives the result of what ran before it -- the
previous step's result in a chain, the list of a group's results (in the group's order)
after a group -- as its payload when that result is a JSON object, and as
``{"result": <the result>}`` otherwise (payloads are JSON objects on the wire); the first
step of a workflow receives ``{}``. A step given a payload receives that payload, and the
previous result is dropped. A group's result is the
list of its members' results in order; a chain's result is its last step's; a chord's is
its callback's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from amqprpc.errors import ContractError

#: The options a step may carry to the cast that runs it.
STEP_OPTIONS = ("countdown", "priority", "idempotency_key")


@dataclass(frozen=True)
class Task:
    """One step: ``action`` of ``service`` (a name, or a local :class:`~amqprpc.Service`
    whose typed handlers let :func:`chain` check what feeds what)."""

    service: Any
    action: str
    payload: Optional[Mapping[str, Any]] = None
    options: Dict[str, Any] = field(default_factory=dict)

    @property
    def service_name(self) -> str:
        return self.service if isinstance(self.service, str) else str(self.service.name)


@dataclass(frozen=True)
class Chain:
    steps: Sequence["Node"]


@dataclass(frozen=True)
class Group:
    steps: Sequence["Node"]


Node = Union[Task, Chain, Group]


def task(service: Any, action: str, payload: Optional[Mapping[str, Any]] = None, **options: Any) -> Task:
    """A step: ``options`` are passed to the cast that runs it (``countdown``,
    ``priority``, ``idempotency_key``, where the client has them). The step's retries are its
    handler's own ``retry=`` policy, as for any cast."""
    unknown = sorted(set(options) - set(STEP_OPTIONS))
    if unknown:
        raise TypeError(f"task(): unknown option(s) {', '.join(unknown)} (known: {', '.join(STEP_OPTIONS)})")
    return Task(service, action, payload, dict(options))


def chain(*steps: Node) -> Chain:
    """Run ``steps`` one after another, each given the previous one's result (unless it has
    a payload of its own). Refused at once when typed handlers say a result cannot feed the
    next step."""
    if not steps:
        raise ValueError("chain() needs at least one step")
    for before, after in zip(steps, steps[1:]):
        _check_feeds(before, after)
    return Chain(tuple(steps))


def group(*steps: Node) -> Group:
    """Run ``steps`` in parallel; the group's result is the list of their results in order."""
    return Group(tuple(steps))


def chord(header: Group, callback: Node) -> Chain:
    """Run the group ``header``, then ``callback`` exactly once with the list of its results."""
    if not isinstance(header, Group):
        raise TypeError("chord(header, callback): header must be a group(...)")
    return chain(header, callback)


def to_json(node: Node, path: str = "0") -> Dict[str, Any]:
    """The node as the plain JSON that travels in step messages, each node with its id."""
    if isinstance(node, Task):
        data: Dict[str, Any] = {"k": "t", "id": path, "s": node.service_name, "a": node.action}
        if node.payload is not None:
            data["p"] = dict(node.payload)
        if node.options:
            data["o"] = dict(node.options)
        return data
    kind = "c" if isinstance(node, Chain) else "g"
    return {"k": kind, "id": path, "n": [to_json(step, f"{path}.{index}") for index, step in enumerate(node.steps)]}


def tasks_of(node: Mapping[str, Any]) -> List[Mapping[str, Any]]:
    """Every task node below ``node`` (JSON), in order."""
    if node["k"] == "t":
        return [node]
    return [leaf for child in node["n"] for leaf in tasks_of(child)]


# --- typed steps ------------------------------------------------------------------------
def _check_feeds(before: Node, after: Node) -> None:
    """When both ends are tasks of local services with typed handlers, the result type of
    ``before`` must be accepted by ``after`` (given no payload of its own)."""
    source, target = _last_task(before), _first_task(after)
    if source is None or target is None or target.payload is not None:
        return
    returns, accepts = _annotation(source, "return"), _annotation(target, "payload")
    if returns is None or accepts is None or _compatible(returns, accepts, isinstance(before, Group)):
        return
    raise ContractError(f"{source.service_name}.{source.action} returns {_name(returns)}"
                        f"{' (a list, from a group)' if isinstance(before, Group) else ''}, which "
                        f"{target.service_name}.{target.action} cannot take as its payload ({_name(accepts)})")


def _last_task(node: Node) -> Optional[Task]:
    if isinstance(node, Task):
        return node
    if isinstance(node, Chain):
        return _last_task(node.steps[-1])
    return node.steps[0] if node.steps and isinstance(node.steps[0], Task) else None


def _first_task(node: Node) -> Optional[Task]:
    if isinstance(node, Task):
        return node
    if isinstance(node, Chain):
        return _first_task(node.steps[0])
    return None


def _annotation(step: Task, which: str) -> Any:
    """The handler's annotated return type, or the type of its payload parameter."""
    if isinstance(step.service, str):
        return None  # known by name only: nothing to check here
    import inspect
    import typing

    handler = step.service.find(step.action)
    function = getattr(handler, "__wrapped__", handler)
    if function is None:
        raise ContractError(f"{step.service_name} has no action {step.action!r}")
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # noqa: BLE001 - unresolvable annotations: nothing to check
        return None
    if which == "return":
        return hints.get("return")
    parameters = list(inspect.signature(function).parameters)
    return hints.get(parameters[0]) if parameters else None


def _compatible(returns: Any, accepts: Any, from_group: bool) -> bool:
    """Whether a handler annotated to take ``accepts`` can take what a step returning
    ``returns`` (a list of them, after a group) hands on under the result rule."""
    if accepts in (Any, object) or returns is Any:
        return True
    if from_group or not _object_like(returns):  # it arrives wrapped: {"result": ...}
        fields = _fields(accepts)
        return _origin(accepts) in (dict, Mapping) or (fields is not None and "result" in fields)
    if _origin(accepts) in (dict, Mapping):
        return True
    if returns is accepts:
        return True
    wanted, given = _fields(accepts), _fields(returns)
    return wanted is None or given is None or set(_required(accepts)) <= set(given)


def _origin(kind: Any) -> Any:
    import typing

    return typing.get_origin(kind) or kind


def _object_like(kind: Any) -> bool:
    return _origin(kind) in (dict, Mapping) or _is_model(kind) or _is_typeddict(kind)


def _fields(kind: Any) -> Any:
    if _is_model(kind):
        return dict(kind.model_fields)
    if _is_typeddict(kind):
        return dict(kind.__annotations__)
    return None


def _required(kind: Any) -> list[str]:
    if _is_model(kind):
        return [name for name, info in kind.model_fields.items() if info.is_required()]
    if _is_typeddict(kind):
        return list(getattr(kind, "__required_keys__", kind.__annotations__))
    return []


def _is_model(kind: Any) -> bool:
    return isinstance(kind, type) and hasattr(kind, "model_validate")


def _is_typeddict(kind: Any) -> bool:
    return isinstance(kind, type) and hasattr(kind, "__total__")


def _name(kind: Any) -> str:
    return getattr(kind, "__name__", None) or str(kind)
