"""``client.proxy("user-service")``: a service's actions as methods, and how payloads and
typed answers are converted for any client (RpcClient, FakeClient...)."""
from __future__ import annotations

from typing import Any, Callable

from amqprpc.caller import Caller
from amqprpc.wire.ids import snake_case


class ServiceProxy:
    """``client.proxy("user-service").get_user(user_id="u1")``; camelCase attribute
    names are sent as snake_case actions (``getUser`` -> ``get_user``). A method takes a
    payload (dict or model) and/or fields as keywords, and ``returns=`` as for ``call``
    (so ``returns`` is no payload field name here)."""

    def __init__(self, client: Caller, service: str, timeout: float | None = None) -> None:
        self._client = client
        self._service = service
        self._timeout = timeout

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_"):
            raise AttributeError(name)
        action = snake_case(name)

        def remote_method(payload: Any = None, *, returns: Any = None, **kwargs: Any) -> Any:
            if kwargs:
                payload = {**outgoing_payload(payload), **kwargs}
            return self._client.call(self._service, action, payload, timeout=self._timeout, returns=returns)

        remote_method.__name__ = action
        return remote_method


def outgoing_payload(payload: Any) -> Any:
    """What the envelope carries: a dict as it is; a pydantic model or dataclass dumped to
    JSON types (:func:`amqprpc.contracts.to_payload`, imported only then)."""
    if payload is None:
        return {}
    if type(payload) is dict:
        return payload
    from amqprpc.contracts import to_payload

    return to_payload(payload)


def parsed_data(returns: Any, data: Any, service: str, action: str) -> Any:
    from amqprpc.contracts import parse

    return parse(returns, data, f"{service}.{action}")
