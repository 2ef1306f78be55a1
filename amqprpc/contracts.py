"""Typed handlers: the payload validated against the handler's annotation before it runs,
a returned model sent as JSON, and the JSON schemas the AsyncAPI documents are made of.

A handler's first parameter annotated with a pydantic model, a dataclass or a TypedDict
(or a union of them) gets the payload parsed into that type by a pydantic ``TypeAdapter``;
a return annotation that is not plain JSON (a model, a dataclass, ``list[User]``, a
``datetime``...) is dumped with ``mode="json"``. Anything else (``dict``, ``Any``, no
annotation) leaves the handler exactly as it was registered: no wrapper, no cost, and
pydantic is never imported (it is the optional extra ``amqprpc[pydantic]``).

Strictness is pydantic's own (lax mode, as for JSON input): a number where a string is
declared is refused, a numeric string where a number is declared is accepted, an ISO
string where a ``datetime`` is declared is parsed. A model that wants more sets it itself,
per field (``Field(strict=True)``) or for the model (``ConfigDict(strict=True)``; mind that
pydantic's strict *Python* mode then also refuses ISO strings for dates and UUIDs, since
the payload reaches it as already-decoded JSON).

Annotations are resolved when the handler is registered; one that does not resolve yet (a
model defined further down the module) is resolved again by :meth:`Service.check`, which
the worker calls before it connects: a bad annotation stops the worker at start
(``amqprpc worker`` exits 2 with a one-line reason), never on the first call.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import functools
import inspect
import sys
import typing
from typing import Any, Callable

from amqprpc.errors import ContractError, ValidationError

# How many failing fields a ValidationError's message lists (its ``errors`` keep them all).
MAX_LISTED = 20

_NONE = type(None)
_JSON_SCALARS = (str, int, float, bool, _NONE)
_PLAIN_PAYLOAD = (dict, collections.abc.Mapping, collections.abc.MutableMapping)
_PLAIN_CONTAINERS = (dict, list, tuple, collections.abc.Mapping, collections.abc.Sequence)
# Common spellings of "the payload as it came" and "plain JSON", recognized as text (with
# ``from __future__ import annotations``) without evaluating them: cheaper, and no
# ``dict | None`` evaluation error on Python 3.9 for a handler that never asked for typing.
_PLAIN_PAYLOAD_TEXT = frozenset({"dict", "Dict", "Any", "object", "Mapping", "MutableMapping", "dict[str,Any]",
                                 "Dict[str,Any]", "Mapping[str,Any]", "dict[str,object]", "Dict[str,object]"})
_PLAIN_RETURN_TEXT = _PLAIN_PAYLOAD_TEXT | frozenset({
    "None", "str", "int", "float", "bool", "list", "List", "list[dict]", "List[dict]", "list[str]", "List[str]",
    "dict|None", "Optional[dict]", "Dict|None", "Optional[Dict]", "list[dict[str,Any]]", "List[Dict[str,Any]]",
    "dict[str,Any]|None", "Optional[dict[str,Any]]", "Optional[Dict[str,Any]]"})


@dataclasses.dataclass(frozen=True)
class Contract:
    """What a handler takes and gives back. ``payload`` / ``returns`` are the declared
    types, or None for "the payload as it came" / "the result as the handler returned it"."""

    where: str
    payload: Any = None
    returns: Any = None
    payload_adapter: Any = None
    returns_adapter: Any = None

    @property
    def typed(self) -> bool:
        return self.payload_adapter is not None or self.returns_adapter is not None

    def payload_schema(self, ref_template: str = "#/$defs/{model}") -> dict[str, Any]:
        """The payload's JSON schema (validation mode); ``{"type": "object"}`` when untyped."""
        if self.payload_adapter is None:
            return {"type": "object"}
        schema: dict[str, Any] = self.payload_adapter.json_schema(ref_template=ref_template, mode="validation")
        return schema

    def returns_schema(self, ref_template: str = "#/$defs/{model}") -> dict[str, Any]:
        """The result's JSON schema (serialization mode); ``{}`` (anything) when undeclared."""
        if self.returns_adapter is not None:
            schema: dict[str, Any] = self.returns_adapter.json_schema(ref_template=ref_template, mode="serialization")
            return schema
        return _plain_schema(self.returns)


def contract_of(function: Callable[..., Any], where: str) -> Contract:
    """The contract a handler's annotations declare. Raises ContractError (one line,
    starting with ``where``) for an annotation that cannot be validated with."""
    target, bound = _unpartial(function)
    annotations = getattr(target, "__annotations__", None) or {}
    if not annotations:
        return Contract(where)
    param = _payload_parameter(target, bound)
    raw_payload = annotations.get(param) if param else None
    raw_return = annotations.get("return")
    if _plain_text(raw_payload, _PLAIN_PAYLOAD_TEXT) and _plain_text(raw_return, _PLAIN_RETURN_TEXT):
        return Contract(where)
    try:
        hints = typing.get_type_hints(target)
    except NameError as exc:
        raise ContractError(f"{where}: an annotation does not resolve ({exc}); define or import it at module level "
                            "(annotations of handlers are looked up in the module's globals)") from None
    except Exception as exc:  # noqa: BLE001 - e.g. 'X | None' evaluated on Python 3.9
        raise ContractError(f"{where}: its annotations cannot be evaluated: {type(exc).__name__}: {exc}") from None
    payload = hints.get(param) if param else None
    returns = hints.get("return")
    payload = None if payload is None or _plain_payload(payload) else payload
    returns = None if returns is None or _plain_json(returns) else returns
    if payload is not None and not _object_type(payload):
        raise ContractError(f"{where}: payload annotation {_name(payload)} is not supported: a payload is a JSON "
                            "object, so annotate it with a pydantic model, a dataclass, a TypedDict or dict")
    if payload is None and returns is None:
        return Contract(where)
    return Contract(where, payload, returns,
                    _adapter_for(payload, where, "payload") if payload is not None else None,
                    _adapter_for(returns, where, "return") if returns is not None else None)


def event_contract(model: Any, where: str) -> Contract:
    """The contract of an event a service publishes (:meth:`Service.publishes`): ``model``
    as its payload (None, ``dict``, ``Any``: any JSON object). Raises ContractError (one
    line, starting with ``where``) for a type that is not an object or that pydantic cannot
    describe."""
    if model is None or _plain_payload(model):
        return Contract(where)
    if not _object_type(model):
        raise ContractError(f"{where}: payload model {_name(model)} is not supported: an event's payload is a JSON "
                            "object, so declare a pydantic model, a dataclass, a TypedDict or dict")
    return Contract(where, model, None, _adapter_for(model, where, "payload"))


def typed(function: Callable[..., Any], where: str, label: str | None = None) -> Callable[..., Any]:
    """``function`` itself when its annotations ask for nothing; else a wrapper that
    validates the payload and dumps the result (see the module's docstring). ``where``
    starts a ContractError's message, ``label`` (``service.action``) a ValidationError's."""
    contract = contract_of(function, where)
    label = label or where
    if not contract.typed:
        return function
    import pydantic

    invalid = pydantic.ValidationError
    validate = contract.payload_adapter.validate_python if contract.payload_adapter is not None else None
    dump = contract.returns_adapter.dump_python if contract.returns_adapter is not None else None

    @functools.wraps(function)
    def handler(payload: Any) -> Any:
        if validate is not None:
            try:
                payload = validate(payload)
            except invalid as exc:
                raise validation_error(f"Invalid payload for {label}", exc) from None
        result = function(payload)
        # warnings=False: a handler annotated '-> User' that returns a plain dict gets it
        # sent as it is, without a serializer warning per call.
        return result if dump is None else dump(result, mode="json", warnings=False)

    handler.__amqprpc_contract__ = contract  # type: ignore[attr-defined]
    return handler


def contract_of_handler(handler: Callable[..., Any], where: str) -> Contract:
    """The contract of a registered handler (wrapped by :func:`typed` or not)."""
    found = getattr(handler, "__amqprpc_contract__", None)
    return found if found is not None else contract_of(handler, where)


# --- the client's side -----------------------------------------------------------------
def to_payload(obj: Any) -> Any:
    """A payload the envelope can carry: dicts as they are, pydantic models and dataclasses
    dumped with ``mode="json"``; anything else is the caller's error (TypeError)."""
    if isinstance(obj, dict):
        return obj
    if isinstance(obj, collections.abc.Mapping):
        return dict(obj)
    dump = getattr(obj, "model_dump", None)
    if dump is not None and callable(dump):
        return dump(mode="json")
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _adapter(type(obj)).dump_python(obj, mode="json")
    raise TypeError(f"a payload is a dict, a pydantic model or a dataclass instance, not {type(obj).__name__}")


def parse(type_: Any, data: Any, where: str) -> Any:
    """``data`` (a reply's) parsed into ``type_``; ValidationError when it does not fit."""
    import pydantic

    try:
        return _adapter(type_).validate_python(data)
    except pydantic.ValidationError as exc:
        raise validation_error(f"Invalid reply from {where}", exc) from None


def validation_error(what: str, exc: Any) -> ValidationError:
    """Our ValidationError from pydantic's: every failing field as ``path: reason``."""
    errors = [{"loc": ".".join(str(part) for part in error.get("loc", ())) or "(root)", "msg": error.get("msg", ""),
               "type": error.get("type", "")} for error in exc.errors(include_url=False)]
    listed = "; ".join(f"{error['loc']}: {error['msg']}" for error in errors[:MAX_LISTED])
    if len(errors) > MAX_LISTED:
        listed += f"; and {len(errors) - MAX_LISTED} more"
    count = f"{len(errors)} error{'s' if len(errors) != 1 else ''}"
    return ValidationError(f"{what} ({count}): {listed}", errors)


# --- annotations -------------------------------------------------------------------------
def unwrap(function: Callable[..., Any]) -> Callable[..., Any]:
    """The function as written: through our wrapper (``__wrapped__``) and ``functools.partial``
    (``service.handler("x")(partial(handle, shop))``), for its annotations, docstring and module."""
    function = getattr(function, "__wrapped__", function)
    return _unpartial(function)[0]


def _unpartial(function: Callable[..., Any]) -> tuple[Callable[..., Any], int]:
    """(the function under any ``functools.partial``, how many positional arguments they bind)."""
    bound = 0
    while isinstance(function, functools.partial):
        bound += len(function.args)
        function = function.func
    return function, bound


def _payload_parameter(function: Callable[..., Any], bound: int = 0) -> str | None:
    """The parameter the payload arrives in: the first one a partial left unbound."""
    code = getattr(function, "__code__", None)
    if code is not None and not inspect.ismethod(function):
        return code.co_varnames[bound] if code.co_argcount > bound else None
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return None
    return parameters[bound].name if len(parameters) > bound else None


def _plain_text(raw: Any, plain: frozenset[Any]) -> bool:
    if raw is None:
        return True
    if isinstance(raw, str):
        return raw.replace(" ", "").replace("typing.", "") in plain
    return False


def _plain_payload(tp: Any) -> bool:
    """dict, Mapping, Any, object (or Optional of them): the handler takes the payload as it came."""
    if tp in (typing.Any, object) or tp in _PLAIN_PAYLOAD:
        return True
    origin = typing.get_origin(tp)
    if origin in _PLAIN_PAYLOAD:
        return True
    if origin is typing.Union or _is_union_type(tp):
        args = [arg for arg in typing.get_args(tp) if arg is not _NONE]
        return all(_plain_payload(arg) for arg in args)
    return False


def _plain_json(tp: Any) -> bool:
    """Whether values of ``tp`` are JSON as they are (no dumping needed)."""
    if tp in (typing.Any, object, None) or tp in _JSON_SCALARS or tp in _PLAIN_CONTAINERS:
        return True
    origin = typing.get_origin(tp)
    if origin in _PLAIN_CONTAINERS or origin is typing.Union or _is_union_type(tp):
        return all(arg is Ellipsis or _plain_json(arg) for arg in typing.get_args(tp))
    return False


def _object_type(tp: Any) -> bool:
    """A type whose values come from a JSON object: a pydantic model, a dataclass, a
    TypedDict, or an Annotated / Union of those."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _object_type(typing.get_args(tp)[0])
    if origin is typing.Union or _is_union_type(tp):
        return all(_object_type(arg) for arg in typing.get_args(tp))
    if not isinstance(tp, type):
        return False
    if dataclasses.is_dataclass(tp) or _is_typeddict(tp):
        return True
    return any(base.__name__ == "BaseModel" and base.__module__.startswith("pydantic") for base in tp.__mro__)


def _is_typeddict(tp: type) -> bool:
    return issubclass(tp, dict) and hasattr(tp, "__required_keys__")


def _is_union_type(tp: Any) -> bool:
    union_type = getattr(sys.modules.get("types"), "UnionType", None)  # 'A | B' (Python 3.10+)
    return union_type is not None and isinstance(tp, union_type)


def _adapter_for(tp: Any, where: str, what: str) -> Any:
    try:
        import pydantic  # noqa: F401 - to say what is missing
    except ImportError:
        raise ContractError(f"{where}: its {what} annotation {_name(tp)} needs pydantic v2: "
                            "pip install 'amqprpc[pydantic]'") from None
    try:
        adapter = _adapter(tp)
        # The schema is built lazily by some pydantic versions: build it now, so a type
        # pydantic cannot describe stops the worker at start, not the first call.
        adapter.json_schema(mode="validation" if what == "payload" else "serialization")
    except Exception as exc:  # noqa: BLE001 - pydantic's schema errors: one line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ContractError(f"{where}: pydantic cannot validate its {what} annotation {_name(tp)}: {reason}") from None
    return adapter


def _adapter(tp: Any) -> Any:
    try:
        return _cached_adapter(tp)
    except TypeError:  # an unhashable annotation: not cached
        from pydantic import TypeAdapter

        return TypeAdapter(tp)


@functools.lru_cache(maxsize=256)
def _cached_adapter(tp: Any) -> Any:
    from pydantic import TypeAdapter

    return TypeAdapter(tp)


def _plain_schema(tp: Any) -> dict[str, Any]:
    """JSON schema of a plain-JSON return annotation (``{}``: anything, when undeclared)."""
    simple = {str: "string", int: "integer", float: "number", bool: "boolean", _NONE: "null", dict: "object",
              list: "array", tuple: "array"}
    if tp in simple:
        return {"type": simple[tp]}
    origin = typing.get_origin(tp)
    if origin in (dict, collections.abc.Mapping):
        return {"type": "object"}
    if origin in (list, tuple, collections.abc.Sequence):
        return {"type": "array"}
    if origin is typing.Union or _is_union_type(tp):
        return {"anyOf": [_plain_schema(arg) for arg in typing.get_args(tp)]}
    return {}


def _name(tp: Any) -> str:
    return getattr(tp, "__qualname__", None) or repr(tp)
