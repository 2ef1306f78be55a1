"""`amqprpc dlq`: list, replay and purge a service's dead letters, end to end."""
import json
import os
import subprocess
import sys

import amqp
import pytest
from kombu import Connection

from amqprpc import RpcClient
from amqprpc.context import current
from amqprpc.testing import running_worker, wait_for
from amqprpc.wire.topology import DEFAULT_TOPOLOGY

pytestmark = pytest.mark.integration


def dlq(*args):
    result = subprocess.run([sys.executable, "-m", "amqprpc", "dlq", *args], capture_output=True, text=True,
                            timeout=30, env=os.environ)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_dlq_lists_replays_keeping_ids_and_purges(service, broker_url):
    broken = True
    handled = []

    @service.handler
    def charge(payload):
        if broken:
            raise ValueError(f"card {payload['card']} declined")
        handled.append((payload["card"], current.get().correlation_id))

    with running_worker(service), RpcClient("tests", broker_url=broker_url) as client:
        ids = {}
        for card in ("c1", "c2", "c3"):
            client.cast(service.name, "charge", {"card": card})
        with Connection(broker_url) as conn:  # and one that is not even JSON
            conn.channel().basic_publish(amqp.Message(b"{oops", content_type="application/json", message_id="junk"),
                                         DEFAULT_TOPOLOGY.service_exchange, DEFAULT_TOPOLOGY.request_key(service.name))
        dead = DEFAULT_TOPOLOGY.dead_queue_name(service.name)
        wait_for(lambda: _count(broker_url, dead) == 4)

        listing = json.loads(dlq(service.name, "--json", "--limit", "10"))
        assert listing["count"] == 4 and len(listing["messages"]) == 4
        by_type = {m["error_type"] for m in listing["messages"]}
        assert by_type == {"ValueError", "BadMessage"}
        for letter in listing["messages"]:
            if letter["error_type"] == "ValueError":
                assert letter["action"] == "charge" and "declined" in letter["error"]
                assert letter["original_routing_key"] == f"request.{service.name}" and letter["attempts"] == 1
                ids[letter["message_id"]] = letter
            else:
                assert letter["message_id"] == "junk" and "Malformed JSON" in letter["error"]
        assert _count(broker_url, dead) == 4  # looking consumed nothing
        text = dlq(service.name, "--limit", "2")
        assert text.startswith(f"4 dead letter(s) in {dead}") and len(text.strip().splitlines()) == 3

        broken = False
        assert "replayed 4 dead letter(s)" in dlq(service.name, "--replay")
        wait_for(lambda: len(handled) == 3)
        assert {message_id for _, message_id in handled} == set(ids)  # the same ids came back
        wait_for(lambda: _count(broker_url, dead) == 1)  # the junk failed again, and only once

        assert json.loads(dlq(service.name, "--purge", "--json")) == {"purged": 1}
        assert json.loads(dlq(service.name, "--json"))["count"] == 0


def test_dlq_of_a_service_that_never_failed_is_empty():
    # The dead-letter queue is declared with the first dead letter: none, nothing to show.
    assert json.loads(dlq("no-such-service-anywhere", "--json"))["count"] == 0
    assert json.loads(dlq("no-such-service-anywhere", "--purge", "--json")) == {"purged": 0}


def test_dlq_without_a_broker_exits_4_without_the_password():
    result = subprocess.run([sys.executable, "-m", "amqprpc", "dlq", "x", "--broker", "amqp://bob:topsecret@127.0.0.1:1//"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 4 and "topsecret" not in result.stderr and "Traceback" not in result.stderr


def _count(broker_url, queue):
    with Connection(broker_url) as conn:
        return conn.channel().queue_declare(queue, passive=True).message_count
