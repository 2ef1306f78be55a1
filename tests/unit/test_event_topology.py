"""Event queues as data: names, bindings and topic matching (no broker needed)."""
import pytest

from amqprpc import Service, Topology
from amqprpc.server.events import event_consumers, service_queue_names, topic_matches


@pytest.mark.parametrize("pattern, key, expected", [
    ("order.created", "order.created", True),
    ("order.*", "order.created", True),
    ("order.*", "order.created.late", False),
    ("order.*", "order", False),
    ("order.#", "order", True),
    ("order.#", "order.a.b", True),
    ("#", "anything.at.all", True),
    ("*.created", "payment.created", True),
    ("#.created", "a.b.created", True),
    ("#.created", "a.b.updated", False),
    ("payment.*", "order.created", False),
])
def test_topic_matches_like_the_broker(pattern, key, expected):
    assert topic_matches(pattern, key) is expected


def shop_service() -> Service:
    service = Service("inventory-service")
    service.event("payment.completed")(lambda payload: None)
    service.event("config.*", name="reload", broadcast=True)(lambda payload: None)
    return service


def test_pool_handlers_share_a_durable_queue_broadcast_handlers_get_their_own():
    service, topology = shop_service(), Topology()
    first = {c.subscription.name: c for c in event_consumers(service, topology, "w1").values()}
    second = {c.subscription.name: c for c in event_consumers(service, topology, "w2").values()}
    pool = first["<lambda>"].queue
    assert pool.name == second["<lambda>"].queue.name == "service.inventory-service.event.<lambda>"
    assert pool.durable and not pool.exclusive and not pool.auto_delete
    assert pool.exchange.name == "event.exchange" and pool.exchange.type == "topic"
    assert pool.routing_key == "payment.completed"
    mine, theirs = first["reload"].queue, second["reload"].queue
    assert mine.name != theirs.name and mine.name.startswith("service.inventory-service.event.reload.")
    assert mine.exclusive and mine.auto_delete and not mine.durable and mine.routing_key == "config.*"
    assert set(c.tag for c in first.values()) == {"w1.event.<lambda>", "w1.event.reload"}
    assert service_queue_names(service, topology) == [
        "service.inventory-service.request", "service.inventory-service.event.<lambda>"]


def test_a_namespaced_topology_renames_every_shared_entity():
    topology = Topology().namespaced("demo-1")
    service = shop_service()
    assert topology.service_exchange == "demo-1.service.exchange"
    assert topology.event_exchange == "demo-1.event.exchange"
    assert topology.request_queue("x").name == "demo-1.service.x.request"
    assert topology.request_key("x") == "request.x"  # routing keys stay: they are per exchange
    assert topology.reply_queue("c").name.startswith("demo-1.amqprpc.reply.c.")
    assert all(name.startswith("demo-1.") for name in service_queue_names(service, topology))
    assert all(c.queue.name.startswith("demo-1.") and c.queue.exchange.name == "demo-1.event.exchange"
               for c in event_consumers(service, topology, "w").values())
