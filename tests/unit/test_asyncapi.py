"""AsyncAPI documents (amqprpc asyncapi): what they say, that the official parser
(@asyncapi/parser, from npm) accepts them, and that the shop's committed ones are current."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

from dataclasses import dataclass

import pytest
from click.testing import CliRunner

from amqprpc import Service, Worker, asyncapi
from amqprpc.cli import main
from amqprpc.errors import ContractError
from amqprpc.ops.loading import known_services, load_service
from amqprpc.wire.topology import Topology

import contract_app

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "apps")  # the helper apps
DOCS = os.path.join(HERE, "..", "..", "docs", "asyncapi")
# The committed documents name this broker (the default one, without credentials).
DOCS_BROKER = "amqp://localhost:5672//"
REGENERATE = f"amqprpc asyncapi --all --out docs/asyncapi --broker {DOCS_BROKER}"
PARSER = os.path.join(HERE, "asyncapi")  # package.json, package-lock.json, validate.mjs


def test_a_typed_service_documents_each_action_its_payload_and_its_reply():
    doc = asyncapi.document(contract_app.build("contract-doc"), broker_url="amqp://localhost:5672//")
    assert doc["asyncapi"] == "3.0.0"
    request = doc["channels"]["request"]
    assert request["address"] == "request.contract-doc"
    assert request["bindings"]["amqp"]["exchange"]["name"] == "service.exchange"
    assert request["x-amqprpc-queue"]["name"] == "service.contract-doc.request"
    operation = doc["operations"]["create_order"]
    assert operation["action"] == "receive" and operation["summary"] == "Place an order."
    assert operation["reply"]["address"]["location"] == "$message.header#/reply_to"
    assert operation["reply"]["messages"] == [{"$ref": "#/channels/reply/messages/create_order.reply"},
                                              {"$ref": "#/channels/reply/messages/error"}]
    messages = doc["components"]["messages"]
    payload = messages["create_order.request"]["payload"]["allOf"][1]["properties"]
    assert payload["action"] == {"const": "create_order"}
    assert payload["payload"] == {"$ref": "#/components/schemas/NewOrder"}
    data = messages["create_order.reply"]["payload"]["allOf"][1]["properties"]["data"]
    assert data == {"$ref": "#/components/schemas/Order"}
    schemas = doc["components"]["schemas"]
    assert schemas["NewOrder"]["required"] == ["user_id", "items"]
    assert schemas["NewOrder"]["properties"]["items"]["items"] == {"$ref": "#/components/schemas/Item"}
    assert schemas["Item"]["properties"]["quantity"]["exclusiveMinimum"] == 0
    assert schemas["Order"]["properties"]["created_at"]["format"] == "date-time"
    # dataclass, TypedDict, plain dict:
    assert messages["get_order.request"]["payload"]["allOf"][1]["properties"]["payload"] == {
        "$ref": "#/components/schemas/Lookup"}
    assert messages["quote.request"]["payload"]["allOf"][1]["properties"]["payload"] == {
        "$ref": "#/components/schemas/Quote"}
    assert messages["echo.request"]["payload"]["allOf"][1]["properties"]["payload"] == {"type": "object"}
    # the envelope's fields, and the error envelope's
    assert set(schemas["RequestEnvelope"]["properties"]) == {
        "message_id", "source_service", "target_service", "action", "timestamp", "correlation_id", "reply_to",
        "headers", "payload"}
    assert set(schemas["ErrorReply"]["properties"]) == {"success", "error", "error_type", "message_id", "errors"}
    # the event it subscribes to
    event = doc["channels"]["event.on_paid"]
    assert event["address"] == "payment.completed"
    assert event["bindings"]["amqp"]["exchange"] == {"name": "event.exchange", "type": "topic", "durable": True,
                                                     "autoDelete": False, "vhost": "/"}
    assert event["x-amqprpc-queue"]["name"] == "service.contract-doc.event.on_paid"
    assert doc["operations"]["event.on_paid"]["channel"] == {"$ref": "#/channels/event.on_paid"}


@dataclass
class Shipped:
    """A parcel left the warehouse."""

    order_id: str
    carrier: str


def publisher(name: str) -> Service:
    """contract_app's service, also publishing: a pydantic model, a dataclass, no model at
    all, and payment.completed, which it subscribes to as well (on_paid)."""
    service = contract_app.build(name)
    service.publishes("order.created", contract_app.Order, description="An order was placed.\n\nOnce per order.")
    service.publishes("order.shipped", Shipped)
    service.publishes("order.audited")
    service.publishes("payment.completed", contract_app.Paid)
    return service


def test_a_service_declaring_a_published_event_gets_a_send_operation_with_its_payload_schema():
    doc = asyncapi.document(publisher("contract-pub"), broker_url=DOCS_BROKER)
    operation = doc["operations"]["publish.order.created"]
    assert operation["action"] == "send" and operation["title"] == "order.created"
    assert operation["summary"] == "An order was placed." and operation["description"].startswith("Once per order.")
    assert operation["channel"] == {"$ref": "#/channels/published.order.created"}
    assert operation["messages"] == [{"$ref": "#/channels/published.order.created/messages/order.created.published"}]
    channel = doc["channels"]["published.order.created"]
    assert channel["address"] == "order.created"
    assert channel["bindings"]["amqp"]["exchange"] == {"name": "event.exchange", "type": "topic", "durable": True,
                                                       "autoDelete": False, "vhost": "/"}
    assert "x-amqprpc-queue" not in channel  # the publisher has no queue: each consumer binds its own
    messages = doc["components"]["messages"]
    envelope = messages["order.created.published"]["payload"]
    assert envelope["allOf"][0] == {"$ref": "#/components/schemas/RequestEnvelope"}
    assert envelope["allOf"][1]["properties"] == {"payload": {"$ref": "#/components/schemas/Order"},
                                                  "action": {"const": "order.created"}, "reply_to": {"type": "null"}}
    schemas = doc["components"]["schemas"]
    assert schemas["Order"]["required"] == ["order_id", "user_id", "items", "created_at"]
    # a dataclass, and no model: any object
    assert messages["order.shipped.published"]["payload"]["allOf"][1]["properties"]["payload"] == {
        "$ref": "#/components/schemas/Shipped"}
    assert schemas["Shipped"]["properties"]["carrier"] == {"title": "Carrier", "type": "string"}
    assert messages["order.audited.published"]["payload"]["allOf"][1]["properties"]["payload"] == {"type": "object"}
    assert "summary" not in doc["operations"]["publish.order.audited"]
    # published and subscribed to (on_paid, pattern payment.completed): one channel, both operations on it
    assert [channel["address"] for channel in doc["channels"].values()].count("payment.completed") == 1
    assert "published.payment.completed" not in doc["channels"]
    shared = doc["channels"]["event.on_paid"]
    assert set(shared["messages"]) == {"on_paid.event", "payment.completed.published"}
    assert doc["operations"]["publish.payment.completed"]["channel"] == {"$ref": "#/channels/event.on_paid"}
    assert doc["operations"]["event.on_paid"]["action"] == "receive"


def test_a_published_event_is_a_routing_key_declared_once_with_a_model_that_can_be_described():
    service = Service("bad-publisher")
    for pattern in ("order.*", "order.#", ""):
        with pytest.raises(ValueError, match="not a pattern"):
            service.publishes(pattern)
    service.publishes("order.created")
    with pytest.raises(ValueError, match="'order.created' is declared twice"):
        service.publishes("order.created", contract_app.Order)
    service.publishes("order.counted", int)  # refused by check(), as a bad handler annotation is
    with pytest.raises(ContractError, match="order.counted"):
        Worker(service, broker_url="amqp://nobody@127.0.0.1:1//")  # before it connects
    with pytest.raises(ContractError) as caught:
        asyncapi.document(service, broker_url=DOCS_BROKER)
    assert str(caught.value) == ("bad-publisher: published event 'order.counted': payload model int is not supported: "
                                 "an event's payload is a JSON object, so declare a pydantic model, a dataclass, a "
                                 "TypedDict or dict")


def test_the_shop_documents_the_events_each_service_publishes():
    order = asyncapi.document(load_service("order-service"), broker_url=DOCS_BROKER)
    operation = order["operations"]["publish.order.created"]
    assert operation["action"] == "send"
    channel = operation["channel"]["$ref"].split("/")[-1]
    assert order["channels"][channel]["address"] == "order.created"
    message = order["components"]["messages"]["order.created.published"]
    assert message["payload"]["allOf"][1]["properties"]["payload"] == {"$ref": "#/components/schemas/OrderCreated"}
    assert "order_id" in order["components"]["schemas"]["OrderCreated"]["required"]
    payment = asyncapi.document(load_service("payment-service"), broker_url=DOCS_BROKER)
    assert {name for name, op in payment["operations"].items() if op["action"] == "send"} == {
        "publish.payment.completed", "publish.payment.failed"}
    for name in ("user-service", "inventory-service", "notification-service"):  # they publish nothing
        doc = asyncapi.document(load_service(name), broker_url=DOCS_BROKER)
        assert all(op["action"] == "receive" for op in doc["operations"].values()), name


def test_names_come_from_the_topology():
    topology = Topology().namespaced("ns")
    doc = asyncapi.document(contract_app.build("contract-ns"), broker_url=DOCS_BROKER, topology=topology)
    assert doc["channels"]["request"]["bindings"]["amqp"]["exchange"]["name"] == "ns.service.exchange"
    assert doc["channels"]["request"]["x-amqprpc-queue"]["name"] == "ns.service.contract-ns.request"
    assert doc["channels"]["event.on_paid"]["bindings"]["amqp"]["exchange"]["name"] == "ns.event.exchange"


def test_the_server_is_the_broker_url_without_its_credentials():
    result = CliRunner().invoke(main, ["asyncapi", "user-service", "--broker",
                                       "amqps://bob:topsecret@rabbit.internal:5671/shop;amqp://bob:topsecret@b2//"])
    assert result.exit_code == 0, result.output
    assert "topsecret" not in result.output and "bob" not in result.output
    servers = json.loads(result.output)["servers"]
    assert servers["rabbitmq"]["host"] == "rabbit.internal:5671" and servers["rabbitmq"]["protocol"] == "amqps"
    assert servers["rabbitmq"]["description"] == "RabbitMQ, vhost 'shop' (TLS)"
    assert servers["rabbitmq2"]["host"] == "b2:5672"


def test_yaml_when_pyyaml_is_there_and_a_clear_usage_error_when_not(monkeypatch):
    import yaml

    result = CliRunner().invoke(main, ["asyncapi", "user-service", "--format", "yaml"])
    assert result.exit_code == 0 and yaml.safe_load(result.output)["asyncapi"] == "3.0.0"
    monkeypatch.setitem(sys.modules, "yaml", None)  # as if PyYAML were not installed
    result = CliRunner().invoke(main, ["asyncapi", "user-service", "--format", "yaml"])
    assert result.exit_code == 2 and "--format yaml needs PyYAML: pip install 'amqprpc[yaml]'" in result.output


def test_usage_errors_exit_2():
    runner = CliRunner()
    assert runner.invoke(main, ["asyncapi"]).exit_code == 2
    assert runner.invoke(main, ["asyncapi", "--all"]).exit_code == 2  # needs --out
    unknown = runner.invoke(main, ["asyncapi", "no-such-service"])
    assert unknown.exit_code == 2 and "Unknown service 'no-such-service'" in unknown.output
    bad = subprocess.run([sys.executable, "-m", "amqprpc", "asyncapi", "bad-unresolved", "--app",
                          "bad_contract_app:unresolved"], capture_output=True, text=True, cwd=HERE, timeout=60)
    assert bad.returncode == 2 and "an annotation does not resolve" in bad.stderr and not bad.stdout


def test_all_writes_one_document_per_service_of_the_entry_points(tmp_path):
    result = CliRunner().invoke(main, ["asyncapi", "--all", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path)) == sorted(f"{name}.json" for name in known_services())


def test_the_committed_shop_documents_are_current():
    committed = sorted(name for name in os.listdir(DOCS) if name.endswith(".json"))
    assert committed == sorted(f"{name}.json" for name in known_services()), f"regenerate: {REGENERATE}"
    for name in known_services():
        with open(os.path.join(DOCS, f"{name}.json"), encoding="utf-8") as file:
            stored = file.read()
        current = asyncapi.dumps(asyncapi.document(load_service(name), broker_url=DOCS_BROKER))
        assert stored == current, f"docs/asyncapi/{name}.json is out of date; regenerate with: {REGENERATE}"


# --- the official parser ------------------------------------------------------------------
def parser_folder() -> str:
    """@asyncapi/parser installed by `npm ci` from the committed lock file, once per lock
    (into ~/.cache, keyed by the lock's hash: a changed lock installs afresh)."""
    if not (shutil.which("npm") and shutil.which("node")):
        pytest.skip("npm/node are not installed: the AsyncAPI documents cannot be checked with @asyncapi/parser "
                    "(apt-get install nodejs npm)")
    with open(os.path.join(PARSER, "package-lock.json"), "rb") as file:
        digest = hashlib.sha256(file.read()).hexdigest()[:16]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = os.path.join(cache, "amqprpc", f"asyncapi-parser-{digest}")
    if not os.path.isdir(os.path.join(folder, "node_modules", "@asyncapi", "parser")):
        work = f"{folder}.{os.getpid()}"  # installed aside, then renamed: parallel runs never see half of it
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
        for name in ("package.json", "package-lock.json"):
            shutil.copy(os.path.join(PARSER, name), work)
        installed = subprocess.run(["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
                                   cwd=work, capture_output=True, text=True, timeout=300)
        assert installed.returncode == 0, f"npm ci failed:\n{installed.stderr[-3000:]}"
        try:
            os.rename(work, folder)
        except OSError:  # another run installed it meanwhile
            shutil.rmtree(work, ignore_errors=True)
    shutil.copy(os.path.join(PARSER, "validate.mjs"), folder)  # ESM resolves packages next to the script
    return folder


def test_the_official_asyncapi_parser_accepts_every_document(tmp_path):
    documents = {os.path.join(DOCS, name): None for name in sorted(os.listdir(DOCS)) if name.endswith(".json")}
    generated = {
        "contract": asyncapi.document(contract_app.build("contract-parsed"), broker_url=DOCS_BROKER),
        "publisher": asyncapi.document(publisher("contract-publisher"), broker_url=DOCS_BROKER),
        "namespaced-tls": asyncapi.document(contract_app.build("contract-parsed"), topology=Topology().namespaced("x"),
                                            broker_url="amqps://u:p@h1:5671/v;amqp://h2//"),
    }
    broken = json.loads(json.dumps(generated["contract"]))
    broken["channels"]["request"]["bindings"]["amqp"]["queue"] = {"name": "both a routing key and a queue"}
    generated["broken"] = broken
    for name, doc in generated.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(doc))
        documents[str(path)] = None
    folder = parser_folder()
    result = subprocess.run(["node", os.path.join(folder, "validate.mjs"), *documents], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    diagnostics = json.loads(result.stdout)
    problems = {path: [d for d in found if d["severity"] <= 1]  # 0 error, 1 warning
                for path, found in diagnostics.items()}
    assert problems.pop(str(tmp_path / "broken.json")), "the parser must be able to fail: a broken binding passed"
    assert problems == {path: [] for path in problems}
