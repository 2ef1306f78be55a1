"""Typed handlers (amqprpc.contracts), without a broker: the registered handler is called
directly, as the worker calls it."""
from __future__ import annotations

import dataclasses
import datetime
import os
import subprocess
import sys

import pytest
from pydantic import BaseModel

from amqprpc import ContractError, Retry, Service, ValidationError, Worker
from amqprpc.contracts import parse, to_payload

import contract_app

HERE = os.path.join(os.path.dirname(__file__), "..", "apps")  # the helper apps


@pytest.fixture
def typed():
    return contract_app.build("contract-unit")


def test_a_valid_payload_reaches_the_handler_as_the_model_and_the_result_goes_back_as_json(typed):
    result = typed.find("create_order")({"user_id": "u1", "items": [{"product_id": "p1", "quantity": "2"}]})
    assert result == {"order_id": "o-1", "user_id": "u1", "items": [{"product_id": "p1", "quantity": 2}],
                      "status": "created", "created_at": "2024-01-02T03:04:05Z"}


def test_an_invalid_payload_names_every_failing_field_and_reason_without_a_traceback(typed):
    with pytest.raises(ValidationError) as caught:
        typed.find("create_order")({"user_id": 42, "items": [{"product_id": "p1", "quantity": 0}, {}]})
    message = str(caught.value)
    assert message.startswith("Invalid payload for contract-unit.create_order (4 errors): ")
    assert "user_id: Input should be a valid string" in message  # pydantic's rule: no number for a string
    assert "items.0.quantity: Input should be greater than 0" in message
    assert "items.1.product_id: Field required" in message and "items.1.quantity: Field required" in message
    assert "Traceback" not in message and "\n" not in message
    assert [error["loc"] for error in caught.value.errors] == [
        "user_id", "items.0.quantity", "items.1.product_id", "items.1.quantity"]
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_dataclass_and_typeddict_payloads_are_validated_too(typed):
    assert typed.find("get_order")({"order_id": "o-9"}) == {"order_id": "o-9", "status": "paid"}
    assert typed.find("quote")({"product_id": "p1", "quantity": 4}) == {"total": 10.0}
    with pytest.raises(ValidationError, match=r"order_id: Field required"):
        typed.find("get_order")({})
    with pytest.raises(ValidationError, match=r"quantity: Input should be a valid integer"):
        typed.find("quote")({"product_id": "p1", "quantity": "four"})


def test_event_handlers_get_the_model(typed):
    contract_app.SEEN.clear()
    typed.events["on_paid"].function({"order_id": "o-1", "amount": "9.5"})
    assert contract_app.SEEN == [contract_app.Paid(order_id="o-1", amount=9.5)]
    with pytest.raises(ValidationError, match="amount: Field required"):
        typed.events["on_paid"].function({"order_id": "o-1"})


def test_dict_and_unannotated_handlers_are_registered_as_they_are(typed):
    service = Service("plain")

    @service.handler
    def bare(payload):
        return payload

    assert service.handlers["bare"] is bare
    assert typed.handlers["echo"] is contract_app.echo
    # The decorator gives back the function as written, typed or not: callable with a model in tests.
    assert contract_app.create_order(contract_app.NewOrder(user_id="u", items=[{"product_id": "p", "quantity": 1}]))


def test_a_service_of_dict_handlers_never_imports_pydantic():
    code = (
        "import sys\n"
        "from amqprpc import Service, RpcClient, Worker\n"
        "s = Service('plain')\n"
        "@s.handler\n"
        "def a(payload: dict) -> dict: return payload\n"
        "@s.handler\n"
        "def b(payload): return payload\n"
        "@s.event('x.*')\n"
        "def c(payload: 'dict[str, Any]') -> None: pass\n"
        "s.publishes('x.created')\n"
        "s.publishes('x.changed', dict, description='untyped')\n"
        "s.check()\n"
        "Worker(s)\n"
        "assert s.handlers['a'] is a and s.handlers['b'] is b and s.events['c'].function is c\n"
        "assert 'pydantic' not in sys.modules, 'pydantic imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


later = Service("forward-refs")


@later.handler
def lookup(payload: LaterQuery) -> LaterAnswer:
    return LaterAnswer(answer=payload.question * 2)


class LaterQuery(BaseModel):
    question: int


class LaterAnswer(BaseModel):
    answer: int


def test_models_defined_further_down_the_module_resolve_when_the_service_is_checked():
    assert later.find("lookup")({"question": 21}) == {"answer": 42}
    with pytest.raises(ValidationError, match="question: Field required"):
        later.find("lookup")({})


@pytest.mark.parametrize("name, reason", [
    ("unresolved", "bad-unresolved: handler 'get_user': an annotation does not resolve (name 'UserQuery' is not "
                   "defined)"),
    ("unsupported", "bad-unsupported: handler 'add': payload annotation int is not supported"),
    ("no_schema", "bad-no-schema: handler 'opaque': pydantic cannot validate its return annotation Opaque"),
])
def test_a_bad_annotation_stops_the_worker_before_it_connects(name, reason):
    import bad_contract_app

    service = getattr(bad_contract_app, name)
    with pytest.raises(ContractError) as caught:
        Worker(service, broker_url="amqp://nobody@127.0.0.1:1//")
    assert str(caught.value).startswith(reason) and "\n" not in str(caught.value)


def test_amqprpc_worker_exits_2_with_one_line_for_a_bad_annotation():
    result = subprocess.run([sys.executable, "-m", "amqprpc", "worker", "bad-unsupported", "--app",
                             "bad_contract_app:unsupported", "--registry-interval", "0", "--broker-wait", "0",
                             "--broker", "amqp://guest:guest@127.0.0.1:1//"],
                            capture_output=True, text=True, timeout=60, cwd=HERE)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: bad-unsupported: handler 'add': payload annotation int")
    assert "Traceback" not in result.stderr


def test_validation_errors_are_never_retried_whatever_the_policy():
    error = ValidationError("Invalid payload for s.a (1 error): x: Field required")
    assert not Retry(max_attempts=5, on=Exception).retries(error, 1)
    assert Retry(max_attempts=5, on=Exception).retries(ValueError("flaky"), 1)


# --- the caller's side --------------------------------------------------------------------
@dataclasses.dataclass
class Stamp:
    at: datetime.datetime


def test_models_and_dataclasses_become_json_payloads():
    order = contract_app.NewOrder(user_id="u", items=[{"product_id": "p", "quantity": 1}])
    assert to_payload(order) == {"user_id": "u", "items": [{"product_id": "p", "quantity": 1}], "note": None}
    assert to_payload(Stamp(datetime.datetime(2024, 1, 1))) == {"at": "2024-01-01T00:00:00"}
    assert to_payload({"a": 1}) == {"a": 1}
    with pytest.raises(TypeError, match="not list"):
        to_payload([1])


def test_a_reply_is_parsed_into_the_type_asked_for_or_raises_validation_error():
    order = parse(contract_app.Later, {"order_id": "o", "status": "paid"}, "s.get_order")
    assert order == contract_app.Later(order_id="o", status="paid")
    assert parse(list[Stamp], [{"at": "2024-01-01T00:00:00"}], "s.a") == [Stamp(datetime.datetime(2024, 1, 1))]
    with pytest.raises(ValidationError, match=r"^Invalid reply from s.get_order \(1 error\): status: Field required$"):
        parse(contract_app.Later, {"order_id": "o"}, "s.get_order")


def shop_handler(shop: str, payload: LaterQuery) -> LaterAnswer:
    """Answer with the shop's help."""
    return LaterAnswer(answer=payload.question + len(shop))


def test_a_partial_over_a_typed_function_is_validated_on_its_first_unbound_parameter():
    import functools

    from amqprpc.asyncapi import document

    service = Service("partials")
    service.handler("answer")(functools.partial(shop_handler, "abc"))
    assert service.find("answer")({"question": 1}) == {"answer": 4}
    with pytest.raises(ValidationError, match="question: Input should be a valid integer"):
        service.find("answer")({"question": "one"})
    operation = document(service, broker_url="amqp://localhost//")["operations"]["answer"]
    assert operation["summary"] == "Answer with the shop's help."
