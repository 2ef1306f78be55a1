"""Interop both ways with a peer that is not amqprpc: raw py-amqp speaking the seed
article's envelope exactly as a php-amqplib service does."""
import json
import threading
import time
import uuid

import amqp
import pytest
from kombu import Connection

from amqprpc import RemoteError, RpcClient
from amqprpc.testing import delete_queues, running_worker

pytestmark = pytest.mark.integration


def raw_connection(broker_url: str) -> amqp.Connection:
    """A plain py-amqp connection to the suite's broker, as a PHP peer would open one."""
    info = Connection(broker_url).info()  # kombu only parses the URL here
    conn = amqp.Connection(f"{info['hostname']}:{info['port']}", userid=info["userid"], password=info["password"],
                           virtual_host=info["virtual_host"])
    conn.connect()
    return conn


def test_foreign_client_gets_a_reply_on_the_queue_named_in_the_body(service, broker_url):
    service.handler("get_user")(lambda payload: {"id": payload["user_id"], "name": "Alice"})
    with running_worker(service):
        conn = raw_connection(broker_url)
        try:
            channel = conn.channel()
            reply_queue, _, _ = channel.queue_declare("", exclusive=True)
            replies = []
            channel.basic_consume(reply_queue, no_ack=True, callback=replies.append)
            message_id, correlation_id = str(uuid.uuid4()), str(uuid.uuid4())
            envelope = {"message_id": message_id, "source_service": "php-order-service",
                        "target_service": service.name, "action": "get_user", "timestamp": int(time.time()),
                        "correlation_id": correlation_id, "reply_to": reply_queue, "headers": {},
                        "payload": {"user_id": "user_001"}}
            # Like the article's PHP client: reply_to and correlation_id only in the body.
            channel.basic_publish(amqp.Message(json.dumps(envelope), content_type="application/json",
                                               delivery_mode=2),
                                  exchange="service.exchange", routing_key=f"request.{service.name}")
            deadline = time.monotonic() + 5
            while not replies and time.monotonic() < deadline:
                try:
                    conn.drain_events(timeout=0.5)
                except TimeoutError:
                    pass
        finally:
            conn.close()
    assert replies, "no reply reached the foreign client's queue"
    reply = replies[0]
    assert reply.properties["correlation_id"] == correlation_id
    assert json.loads(reply.body) == {"success": True, "data": {"id": "user_001", "name": "Alice"},
                                      "message_id": message_id}


@pytest.fixture
def foreign_server(service_name, broker_url):
    """A user-service written against the article, not amqprpc: it takes reply_to from the
    body and answers {success, data|error, message_id}, without a correlation_id property."""
    queue = f"service.{service_name}.request"
    conn = raw_connection(broker_url)
    channel = conn.channel()
    channel.exchange_declare("service.exchange", "direct", durable=True, auto_delete=False)
    channel.queue_declare(queue, durable=True, auto_delete=False)
    channel.queue_bind(queue, "service.exchange", f"request.{service_name}")
    received = []

    def on_request(message):
        request = json.loads(message.body)
        received.append(request)
        if request["payload"].get("user_id") == "missing":
            reply = {"success": False, "error": "User not found", "error_type": "NotFound",
                     "message_id": request["message_id"]}
        else:
            reply = {"success": True, "data": {"id": request["payload"]["user_id"]},
                     "message_id": request["message_id"]}
        channel.basic_publish(amqp.Message(json.dumps(reply), content_type="application/json"),
                              exchange="", routing_key=request["reply_to"])
        channel.basic_ack(message.delivery_tag)

    channel.basic_consume(queue, callback=on_request)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn.drain_events(timeout=0.1)
            except TimeoutError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield received
    stop.set()
    thread.join(5)
    conn.close()
    delete_queues(queue)


def test_amqprpc_client_calls_a_foreign_server(service_name, foreign_server, broker_url):
    with RpcClient("order-service", broker_url=broker_url) as client:
        assert client.call(service_name, "get_user", {"user_id": "user_007"}) == {"id": "user_007"}
        with pytest.raises(RemoteError) as info:
            client.call(service_name, "get_user", {"user_id": "missing"})
    assert (info.value.error_type, info.value.message) == ("NotFound", "User not found")
    request = foreign_server[0]
    assert set(request) >= {"message_id", "source_service", "target_service", "action", "timestamp",
                            "correlation_id", "reply_to", "headers", "payload"}
    assert request["source_service"] == "order-service" and request["target_service"] == service_name
    assert request["reply_to"] == client.reply_queue.name
