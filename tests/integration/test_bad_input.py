"""Bad input never crashes a worker: 1,000 bad messages of every kind among 1,000 good calls,
against a worker running as a real process (so its RSS is its own)."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kombu import Connection

import amqp
from amqprpc import RpcClient
from amqprpc.wire import envelope
from amqprpc import retry as h
from amqprpc.errors import BadMessage
from amqprpc.testing import delete_queues, wait_for
from amqprpc.wire.topology import DEFAULT_TOPOLOGY

TESTS = os.path.join(os.path.dirname(__file__), "..", "apps")  # the helper apps
LIMIT = 64 * 1024  # --max-message-bytes for the soak: oversized bodies stay cheap to send


def envelope_doc(**overrides):
    doc = {"message_id": envelope.new_id(), "source_service": "fuzz", "target_service": "x", "action": "echo",
           "timestamp": 1, "correlation_id": None, "reply_to": None, "headers": {}, "payload": {"k": 1}}
    doc.update(overrides)
    return doc


# kind -> (body, content_type, error text the reply or dead letter must name)
BAD_KINDS = {
    "malformed json": (b'{"action": "echo", "payload": {', "application/json", "Malformed JSON"),
    "not an object": (b'["echo", {}]', "application/json", "must be a JSON object"),
    "missing action": (json.dumps(envelope_doc(action=None)).encode(), "application/json", "no action"),
    "missing payload": (json.dumps({k: v for k, v in envelope_doc().items() if k != "payload"}).encode(),
                        "application/json", "no payload"),
    "payload not an object": (json.dumps(envelope_doc(payload=[1, 2])).encode(), "application/json",
                              "Payload must be a JSON object"),
    "pickle": (pickle.dumps(envelope_doc()), "application/x-python-serialize", "Unsupported content type"),
    "oversized": (json.dumps(envelope_doc(payload={"blob": "x" * (LIMIT + 100)})).encode(), "application/json",
                  "too large"),
    "nested too deep": (b"[" * 60000, "application/json", "nested too deeply"),
    "unknown action": (json.dumps(envelope_doc(action="no_such_action")).encode(), "application/json",
                       "Unknown action: no_such_action"),
}


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


@pytest.mark.integration
def test_1000_bad_messages_among_1000_good_calls_are_all_accounted_for_and_the_worker_stays_flat(
        service_name, broker_url):
    env = {**os.environ, "AMQPRPC_TEST_SERVICE": service_name, "PYTHONPATH": TESTS}
    worker = subprocess.Popen(
        [sys.executable, "-m", "amqprpc", "worker", service_name, "--app", "retry_app:service", "--concurrency", "4",
         "--max-message-bytes", str(LIMIT), "--log-level", "error"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dead_queue = DEFAULT_TOPOLOGY.dead_queue_name(service_name)
    kinds = list(BAD_KINDS)
    try:
        with Connection(broker_url) as conn, RpcClient("soak", broker_url=broker_url) as client:
            raw = conn.channel()
            wait_for(lambda: _count(conn, DEFAULT_TOPOLOGY.request_queue_format.format(service=service_name),
                                    "consumer_count"), timeout=20)  # the worker consumes: declared and bound
            reply_queue = raw.queue_declare("", exclusive=True).queue
            rss = []
            replies, expected_dead = {}, 0
            for phase in range(2):
                expected_replies = {}
                futures = []
                for n in range(1000):
                    kind = kinds[n % len(kinds)]
                    body, content_type, reason = BAD_KINDS[kind]
                    answered = (n // len(kinds)) % 2 == 0  # every kind both with and without reply_to
                    properties = {"content_type": content_type, "delivery_mode": 2}
                    if answered:
                        correlation_id = f"{phase}-{n}"
                        properties.update(reply_to=reply_queue, correlation_id=correlation_id)
                        expected_replies[correlation_id] = reason
                    else:
                        expected_dead += 1
                    raw.basic_publish(amqp.Message(body, **properties), DEFAULT_TOPOLOGY.service_exchange,
                                      DEFAULT_TOPOLOGY.request_key(service_name))
                    futures.append((n, client.call_async(service_name, "echo", {"n": n}, timeout=60)))
                assert [future.result(90) for _, future in futures] == [{"n": n} for n, _ in futures]
                wait_for(lambda: (_drain(raw, reply_queue, replies), all(cid in replies for cid in expected_replies))[1],
                         timeout=60)
                for correlation_id, reason in expected_replies.items():
                    reply = replies[correlation_id]
                    assert reply["success"] is False and reason in reply["error"], (correlation_id, reply)
                wait_for(lambda: _count(conn, dead_queue) == expected_dead,
                         timeout=60)
                assert worker.poll() is None, "the worker died"
                rss.append(rss_kib(worker.pid))
            # Every dead letter names its reason; none is lost, none counted twice.
            reasons = []
            while (letter := raw.basic_get(dead_queue, no_ack=True)) is not None:
                reasons.append(h.headers_of(letter)[h.ERROR])
            assert len(reasons) == expected_dead and len(replies) == 2000 - expected_dead
            for kind, (_, _, reason) in BAD_KINDS.items():
                assert any(reason in text for text in reasons), kind
            print(f"\nworker RSS after 2,000 messages: {rss[0]} KiB, after 4,000: {rss[1]} KiB "
                  f"(+{rss[1] - rss[0]} KiB); error replies {len(replies)}, dead letters {len(reasons)}")
            # Flat: the second thousand of each must not grow the worker like the first did.
            assert rss[1] - rss[0] < 8 * 1024, rss
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        request = DEFAULT_TOPOLOGY.request_queue_format.format(service=service_name)
        delete_queues(request, *DEFAULT_TOPOLOGY.retry_queue_names(service_name, [request]), broker_url=broker_url)


def _count(conn, queue, what="message_count"):
    """Messages (or consumers) of ``queue``, None if it does not exist (on a channel of its
    own: a failed passive declare closes the channel it ran on)."""
    channel = conn.channel()
    try:
        return getattr(channel.queue_declare(queue, passive=True), what)
    except amqp.exceptions.NotFound:
        return None
    finally:
        if channel.is_open:
            channel.close()


def _drain(channel, queue, replies) -> bool:
    """Move every waiting reply into ``replies``; True if any was there."""
    got = False
    while (message := channel.basic_get(queue, no_ack=True)) is not None:
        replies[message.properties["correlation_id"]] = json.loads(message.body)
        got = True
    return got


# --- property-based: the decoder never raises anything but BadMessage --------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8)
envelopes = st.fixed_dictionaries({}, optional={
    "action": json_values, "payload": json_values, "headers": json_values, "message_id": json_values,
    "correlation_id": json_values, "reply_to": json_values}).map(lambda doc: json.dumps(doc).encode())
content_types = st.sampled_from([None, "", "application/json", "APPLICATION/JSON", "text/json",
                                 "application/x-python-serialize", "text/plain; charset=utf-8"]) | st.text(max_size=30)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@FUZZ
@given(body=st.binary(max_size=512) | envelopes | st.text(max_size=200), content_type=content_types,
       max_bytes=st.none() | st.integers(min_value=0, max_value=600))
def test_decode_request_raises_only_bad_message_for_any_input(body, content_type, max_bytes):
    properties = {} if content_type is None else {"content_type": content_type}
    try:
        request = envelope.decode_request(body, properties, max_bytes)
    except BadMessage as exc:
        assert exc.reason
    else:
        assert isinstance(request.action, str) and isinstance(request.payload, dict)
        assert isinstance(request.headers, dict) and request.message_id
        request.deadline, request.trace_id  # derived fields never raise either
    envelope.reply_address(properties, body)  # never raises, whatever the body


@pytest.mark.parametrize("body", [b"[" * 100000, b'{"a":' * 50000, b"\xff\xfe\x00", b"\x80\x04K\x01."])
def test_pathological_bodies_are_bad_messages_not_crashes(body):
    with pytest.raises(BadMessage):
        envelope.decode_request(body, {"content_type": "application/json"})
    envelope.reply_address({}, body)
