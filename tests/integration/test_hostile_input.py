"""Hostile input a broker routes but py-amqp cannot decode, or that cannot travel back.

Every bad message among good calls is answered or dead-lettered (with its raw bytes, the
reason and where it came from), and the worker, collector and client keep their one
connection: 0 reconnects. Real worker and collector processes, messages hand-built frame
by frame (:mod:`rawframes`) where py-amqp would not encode them.
"""
from __future__ import annotations

import json
import math
import signal
import struct

import amqp
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kombu import Connection

from amqprpc import RemoteError, RpcClient, ServiceUnavailable
from amqprpc.wire import envelope
from amqprpc import retry as h
from amqprpc.config import redis_url
from amqprpc.transport.framehandler import lenient_properties
from amqprpc.middleware import Middleware
from amqprpc.testing import delete_queues, unique_name, wait_for
from amqprpc.wire.topology import DEFAULT_TOPOLOGY
from procs import collector
from rawframes import array, encode_properties, entry, nested_tables, publish, table
from workerproc import WorkerProcess

pytestmark = pytest.mark.integration

SHORTSTRS = ("content_type", "content_encoding", "correlation_id", "reply_to", "message_id", "type", "app_id",
             "cluster_id")  # expiration and user_id: RabbitMQ itself refuses those when they are not valid


def request(action="echo", payload=None, **fields) -> bytes:
    doc = {"message_id": envelope.new_id(), "source_service": "hostile", "target_service": "x", "action": action,
           "timestamp": 1, "correlation_id": None, "reply_to": None, "headers": {}, "payload": payload or {"k": 1}}
    doc.update(fields)
    return json.dumps(doc).encode()


@pytest.fixture
def raw(broker_url):
    """A plain py-amqp connection (no amqprpc frame handler) for publishing and reading."""
    with Connection(broker_url) as conn:
        conn.connect()
        yield conn.connection


@pytest.fixture
def worker(service_name, broker_url, tmp_path, raw):
    process = WorkerProcess(service_name, str(tmp_path / "worker.log"), "--concurrency", "4",
                            "--max-message-bytes", str(256 * 1024), app="hostile_app:service", broker_url=broker_url)
    process.wait_event("worker ready")
    yield process
    process.process.send_signal(signal.SIGTERM)
    code = process.wait(30)
    request_queue = DEFAULT_TOPOLOGY.request_queue_format.format(service=service_name)
    event_queue = DEFAULT_TOPOLOGY.event_queue_format.format(service=service_name, handler="seen")
    delete_queues(request_queue, event_queue,
                  *DEFAULT_TOPOLOGY.retry_queue_names(service_name, [request_queue, event_queue]), broker_url=broker_url)
    assert code == 0, process.text()


def reconnects(process: WorkerProcess) -> int:
    return len(process.events("broker connection lost")) + len(process.events("broker reconnected"))


def count(raw, queue: str) -> int:
    channel = raw.channel()
    try:
        return channel.queue_declare(queue, passive=True).message_count
    except amqp.exceptions.NotFound:
        return 0
    finally:
        if channel.is_open:
            channel.close()


def take_all(raw, queue: str) -> list[amqp.Message]:
    channel, taken = raw.channel(), []
    while (message := channel.basic_get(queue, no_ack=True)) is not None:
        taken.append(message)
    channel.close()
    return taken


# name -> (properties, body, how many error replies, how many dead letters, what x-error or the reply names)
def request_kinds(reply_queue: str, cc_queue: str) -> dict:
    kinds = {}
    for name in SHORTSTRS:
        kinds[f"{name} not UTF-8"] = ({name: b"\xff\xfe" + name.encode()}, request(), 0, 1, f"{name} is not UTF-8")
    kinds["content_type not UTF-8, reply_to fine"] = (
        {"content_type": b"\xffjson", "reply_to": reply_queue, "correlation_id": "c-ct"}, request(), 1, 1,
        "content_type is not UTF-8")
    kinds["header timestamp past year 9999"] = (
        {"application_headers": table(entry("t", "T", struct.pack(">Q", 2 ** 63)))}, request(), 0, 1,
        "application_headers table does not decode (OverflowError")
    kinds["headers nested 2,000 deep"] = (
        {"application_headers": nested_tables(2000)}, request(), 0, 1, "(RecursionError")
    # With its bookkeeping headers added the dead letter's content header would not fit a
    # frame (the broker would close the connection): the original headers are dropped.
    kinds["headers filling a frame, bad body"] = (
        {"application_headers": {"blob": "x" * 130900}}, b"not json", 0, 1, "Malformed JSON")
    kinds["empty body, content_encoding no codec"] = ({"content_encoding": "no-such-codec"}, b"", 0, 1,
                                                      "Malformed JSON")  # py-amqp's "" would be encoded with it
    kinds["header key not UTF-8, bad body"] = (  # py-amqp decodes the key as bytes
        {"application_headers": table(entry(b"\xa9", "S", struct.pack(">I", 0)))}, b"", 0, 1, "Malformed JSON")
    kinds["CC header, bad body"] = (
        {"application_headers": {"CC": [cc_queue]}}, b"not json", 0, 1, "Malformed JSON")
    kinds["x-attempts a table, x-deliveries 2**63-1"] = (  # (RabbitMQ itself refuses inf and nan doubles)
        {"reply_to": reply_queue, "correlation_id": "c-odd", "application_headers": table(
            entry(h.ATTEMPTS, "F", table()), entry(h.DELIVERIES, "l", struct.pack(">q", 2 ** 63 - 1)))},
        request(payload={"ok": 1}), 1, 0, '"success":true')
    kinds["reply_to of 256 bytes"] = ({}, request(reply_to="q" * 256), 0, 1, "reply_to is 256 bytes long")
    kinds["correlation_id of 256 bytes"] = (
        {"reply_to": reply_queue}, request(correlation_id="c" * 256), 1, 0, "correlation_id is 256 bytes long")
    kinds["lone surrogate in reply_to"] = ({}, b'{"action":"echo","payload":{},"reply_to":"\\ud800' + b"q" * 254 + b'"}',
                                           0, 1, "reply_to is 257 bytes long")
    kinds["content_encoding punycode"] = (  # the body stays bytes: py-amqp's auto_decode is off
        {"content_encoding": "punycode", "reply_to": reply_queue, "correlation_id": "c-puny"},
        request(payload={"p": 1}), 1, 0, '"success":true')
    kinds["a number past float"] = ({"reply_to": reply_queue, "correlation_id": "c-inf-number"},
                                    request(payload={"n": 1}).replace(b'"n": 1', b'"n": 1e999'), 1, 0,
                                    "not JSON serializable")
    kinds["an integer of 5,000 digits"] = ({"reply_to": reply_queue, "correlation_id": "c-digits"},
                                           request(payload={"n": 1}).replace(b'"n": 1', b'"n": ' + b"9" * 5000), 1, 0,
                                           "Malformed JSON")
    return kinds


def test_poison_requests_of_every_kind_are_dead_lettered_or_answered_and_the_worker_never_reconnects(
        worker, service_name, broker_url, raw):
    channel = raw.channel()
    reply_queue = channel.queue_declare("", exclusive=True).queue
    cc_queue = channel.queue_declare(unique_name("hostile-cc"), exclusive=True).queue
    channel.queue_bind(cc_queue, DEFAULT_TOPOLOGY.service_exchange, cc_queue)  # where the CC header routes copies
    kinds = request_kinds(reply_queue, cc_queue)
    dead_queue = DEFAULT_TOPOLOGY.dead_queue_name(service_name)
    with RpcClient("hostile", broker_url=broker_url) as client:
        calls = []
        for n, (properties, body, _, _, _) in enumerate(kinds.values()):
            publish(raw, channel, DEFAULT_TOPOLOGY.service_exchange, DEFAULT_TOPOLOGY.request_key(service_name),
                    encode_properties(properties), body)
            calls.append(client.call_async(service_name, "echo", {"n": n}, timeout=30))
        answered = [future.result(40) for future in calls]
        assert answered == [{"n": n} for n in range(len(kinds))]
        expected_dead = sum(kind[3] for kind in kinds.values())
        expected_replies = sum(kind[2] for kind in kinds.values())
        wait_for(lambda: count(raw, dead_queue) == expected_dead and count(raw, reply_queue) == expected_replies,
                 timeout=30)
        assert client.call(service_name, "echo", {"after": True}, timeout=10) == {"after": True}
    letters = take_all(raw, dead_queue)  # plain py-amqp reads every dead letter
    replies = [message.body.decode() for message in take_all(raw, reply_queue)]
    errors = [str(h.headers_of(letter)[h.ERROR]) for letter in letters]
    for kind, (properties, _, n_replies, n_dead, reason) in kinds.items():
        found = [text for text in (errors if n_dead else replies) if reason in text]
        assert found, (kind, reason, errors, replies)
    undecodable = [letter for letter in letters if h.headers_of(letter)[h.ERROR_TYPE] == "UndecodableMessage"]
    # py-amqp < 5.4 cannot decode a header key that is not UTF-8 either (5.4 keeps it as bytes).
    assert len(undecodable) in (len(SHORTSTRS) + 3, len(SHORTSTRS) + 4)
    for letter in undecodable:
        headers = h.headers_of(letter)
        assert headers[h.RAW_PROPERTIES] and headers[h.ORIGINAL_QUEUE].endswith(".request")
        assert (letter.body or b"") in {kind[1] for kind in kinds.values()}  # as it came (py-amqp: "" if empty)
    assert count(raw, cc_queue) == 1  # the original's CC copy; the dead letter was not routed there again
    assert sum(1 for letter in letters if h.headers_of(letter).get("x-headers-dropped") == 1) == 1
    assert reconnects(worker) == 0, worker.text()
    print(f"\npoison requests: {len(kinds)} kinds among {len(kinds) + 1} good calls; good answered "
          f"{len(answered) + 1}, dead-lettered {len(letters)}, error replies {len(replies)}, reconnects 0")


def test_poison_events_and_a_routing_key_that_is_not_utf8_are_dead_lettered(worker, service_name, broker_url, raw,
                                                                             redis_available):
    counts = redis.Redis.from_url(redis_url())
    key = unique_name("hostile-events")
    channel = raw.channel()
    exchange, dead_queue = DEFAULT_TOPOLOGY.event_exchange, DEFAULT_TOPOLOGY.dead_queue_name(service_name)
    try:
        bad = [(f"{service_name}.x".encode(), {"content_type": b"\xff"}),
               (f"{service_name}.x".encode(), {"application_headers": nested_tables(1500)}),
               (f"{service_name}.\xff".encode("latin-1"), {})]  # routed by order.* patterns; py-amqp cannot decode it
        for n, (routing_key, properties) in enumerate(bad):
            publish(raw, channel, exchange, routing_key, encode_properties(properties),
                    request("x", payload={"key": key, "n": f"bad-{n}"}))
            publish(raw, channel, exchange, f"{service_name}.x", encode_properties({}),
                    request("x", payload={"key": key, "n": n}))
        wait_for(lambda: counts.hlen(key) == len(bad) and count(raw, dead_queue) == len(bad), timeout=30)
        assert sorted(counts.hkeys(key)) == [str(n).encode() for n in range(len(bad))]
        letters = take_all(raw, dead_queue)
        assert all(h.headers_of(letter)[h.ORIGINAL_QUEUE].endswith(".event.seen") for letter in letters)
        assert any(h.headers_of(letter)[h.ORIGINAL_ROUTING_KEY] == f"{service_name}.\\xff" for letter in letters)
        assert reconnects(worker) == 0, worker.text()
    finally:
        counts.delete(key)


def test_poison_replies_in_the_collector_queue_are_dead_lettered(broker_url, raw, redis_available):
    queue, prefix = unique_name("hostile-responses"), unique_name("hostile-store")
    store = redis.Redis.from_url(redis_url())
    proc = collector(queue, prefix)
    channel = raw.channel()
    try:
        bad = [{"correlation_id": b"\xff\xfe"}, {"content_type": b"\xff"},
               {"application_headers": table(entry("t", "T", struct.pack(">Q", 2 ** 64 - 1)))}, {}]
        for n, properties in enumerate(bad):
            publish(raw, channel, "", queue, encode_properties(properties), b'{"success":true,"data":1}')
            publish(raw, channel, "", queue, encode_properties({"correlation_id": f"good-{n}"}),
                    b'{"success":true,"data":%d}' % n)
        wait_for(lambda: count(raw, f"{queue}.dead") == len(bad), timeout=30)
        wait_for(lambda: len(store.keys(f"{prefix}*")) == len(bad), timeout=30)
        assert "broker connection lost" not in proc.output
    finally:
        assert proc.stop() == 0, proc.output
        for key in store.keys(f"{prefix}*"):
            store.delete(key)
        delete_queues(queue, f"{queue}.dead", broker_url=broker_url)


def test_a_poison_reply_fails_only_the_call_it_names_and_the_client_keeps_its_connection(
        worker, service_name, broker_url, raw):
    channel = raw.channel()
    # A service nobody serves: the test takes its requests and answers them with poison.
    silent = unique_name("hostile-silent")
    silent_queue = channel.queue_declare(DEFAULT_TOPOLOGY.request_queue_format.format(service=silent),
                                         exclusive=True).queue
    channel.queue_bind(silent_queue, DEFAULT_TOPOLOGY.service_exchange, DEFAULT_TOPOLOGY.request_key(silent))
    with RpcClient("hostile-client", broker_url=broker_url) as client:
        generation = client._loop.generation
        call = client.call_async(silent, "echo", {}, timeout=20)
        message_id = wait_for(lambda: channel.basic_get(silent_queue, no_ack=True), timeout=10).properties["message_id"]
        body = json.dumps({"success": True, "data": 1, "message_id": message_id}).encode()
        for properties in ({"correlation_id": b"\xff" + message_id.encode()}, {"content_type": b"\xfe"}):
            publish(raw, channel, "", client.reply_queue.name, encode_properties(properties), body)
        with pytest.raises(RemoteError, match="the reply could not be decoded: correlation_id is not UTF-8"):
            call.result(10)
        publish(raw, channel, "", client.reply_queue.name, encode_properties({"type": b"\xff"}), b"{}")  # names no call
        assert client.call(service_name, "echo", {"n": 1}, timeout=10) == {"n": 1}
        assert client._loop.generation == generation and client._loop.connected.is_set()


# --- property-based: arbitrary properties and bodies into a live worker ---------------------
# Only what RabbitMQ routes: it refuses delivery modes other than 1 and 2, expiration and
# user_id values it cannot check, non-finite doubles and table type letters it does not know.
REPLY = b"<the test's reply queue>"
not_utf8 = st.binary(min_size=1, max_size=24).filter(lambda raw: not _utf8(raw))
short_strings = st.binary(max_size=24) | st.text(max_size=12).map(str.encode)
scalars = st.one_of(
    st.binary(max_size=12).map(lambda raw: ("S", struct.pack(">I", len(raw)) + raw)),
    st.integers(-2 ** 31, 2 ** 31 - 1).map(lambda n: ("I", struct.pack(">i", n))),
    st.integers(-2 ** 63, 2 ** 63 - 1).map(lambda n: ("l", struct.pack(">q", n))),
    st.integers(0, 2 ** 64 - 1).map(lambda n: ("T", struct.pack(">Q", n))),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda f: ("d", struct.pack(">d", f))),
    st.tuples(st.integers(0, 255), st.integers(-2 ** 31, 2 ** 31 - 1)).map(lambda d: ("D", struct.pack(">Bi", *d))),
    st.booleans().map(lambda b: ("t", bytes([b]))),
    st.just(("V", b"")),
    st.binary(max_size=8).map(lambda raw: ("x", struct.pack(">I", len(raw)) + raw)))
field_values = st.recursive(scalars, lambda children: st.one_of(
    st.lists(st.tuples(st.binary(max_size=6), children), max_size=3).map(
        lambda items: ("F", table(*[entry(key, kind, value) for key, (kind, value) in items]))),
    st.lists(children, max_size=3).map(lambda items: ("A", array(*items)))), max_leaves=6)
header_tables = st.lists(st.tuples(st.binary(max_size=8), field_values), max_size=4).map(
    lambda items: table(*[entry(key, kind, value) for key, (kind, value) in items])) | st.just(nested_tables(1200))
any_properties = st.fixed_dictionaries({}, optional={
    "content_type": short_strings, "content_encoding": short_strings | st.just(b"punycode"),
    "application_headers": header_tables, "delivery_mode": st.sampled_from([1, 2]), "priority": st.integers(0, 255),
    "correlation_id": short_strings, "reply_to": st.just(REPLY) | not_utf8, "message_id": short_strings,
    "timestamp": st.integers(0, 2 ** 64 - 1), "type": short_strings, "app_id": short_strings,
    "cluster_id": short_strings})
# Never a request the worker runs silently: garbage, or an action it does not have.
any_bodies = st.binary(max_size=300) | st.sampled_from([b"[" * 5000, b"9" * 5000, b'{"action":"echo"}']) | \
    st.fixed_dictionaries({"action": st.sampled_from(["no_such_action", ""])},
                          optional={"payload": st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
                                    "headers": st.dictionaries(st.text(max_size=5), st.text(max_size=5))}
                          ).map(lambda doc: json.dumps(doc).encode())


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return False
    return True


@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_arbitrary_properties_and_bodies_into_a_live_worker_are_each_answered_or_dead_lettered(
        worker, service_name, broker_url, raw, data):
    channel = raw.channel()
    reply_queue = _reply_queue(raw)
    dead_queue = DEFAULT_TOPOLOGY.dead_queue_name(service_name)
    properties, body = data.draw(any_properties), data.draw(any_bodies)
    if properties.get("reply_to") == REPLY:
        properties["reply_to"] = reply_queue
    before = count(raw, dead_queue) + count(raw, reply_queue)
    publish(raw, channel, DEFAULT_TOPOLOGY.service_exchange, DEFAULT_TOPOLOGY.request_key(service_name),
            encode_properties(properties), body)
    try:
        wait_for(lambda: count(raw, dead_queue) + count(raw, reply_queue) > before, timeout=20)
    except AssertionError:
        raise AssertionError(f"neither answered nor dead-lettered: {properties!r} {body[:100]!r}\n"
                             f"{worker.text()}") from None
    channel.close()
    assert reconnects(worker) == 0, worker.text()


def _reply_queue(raw) -> str:
    """One exclusive reply queue for all examples of a test (hypothesis reruns the body)."""
    if getattr(raw, "test_reply_queue", None) is None:
        raw.test_reply_queue = raw.channel().queue_declare("", exclusive=True).queue
    return raw.test_reply_queue


def test_lenient_properties_reads_what_decodes_and_names_what_does_not():
    properties, problems = lenient_properties(encode_properties({
        "content_type": b"\xff", "application_headers": nested_tables(3000), "delivery_mode": 2,
        "correlation_id": "c1", "timestamp": 2 ** 64 - 1, "app_id": "app"}))
    assert properties == {"delivery_mode": 2, "correlation_id": "c1", "timestamp": 2 ** 64 - 1, "app_id": "app"}
    assert problems[0].startswith("content_type is not UTF-8") and "RecursionError" in problems[1]
    assert lenient_properties(encode_properties({"reply_to": "q"})[:-1])[1] == ["the property list ends early"]


def test_reply_fields_that_cannot_travel_back_are_bad_input():
    from amqprpc.errors import BadMessage

    with pytest.raises(BadMessage, match="reply_to is 256 bytes long"):
        envelope.decode_request(request(reply_to="r" * 256), {})
    with pytest.raises(BadMessage, match="correlation_id is 300 bytes long"):
        envelope.decode_request(request(reply_to="r", correlation_id="é" * 150), {})
    assert envelope.decode_request(request(correlation_id="c" * 300), {}).correlation_id == "c" * 300  # no reply: fine
    assert envelope.reply_address({}, request(reply_to="r" * 256, correlation_id="c")) == (None, "c")
    assert envelope.loads(envelope.dumps({"s": "\ud800"})) == {"s": "\ud800"}
    assert envelope.Request(*[None] * 7, {"deadline": 10 ** 400}).deadline is None
    assert envelope.Request(*[None] * 7, {"deadline": math.inf}).deadline is None
    assert h.attempts_made({h.ATTEMPTS: math.inf}) == 0 and h.attempts_made({h.ATTEMPTS: math.nan}) == 0


def test_a_copy_that_cannot_be_encoded_goes_as_a_bare_dead_letter_else_the_original_is_rejected():
    from amqprpc.outcome import OutcomeKind
    from amqprpc.transport.redelivery import Forward, Forwarder

    forwarder, sent, rejected = Forwarder(), [], []

    class Channel:
        def basic_reject(self, delivery_tag, requeue):
            rejected.append((delivery_tag, requeue))

    def send(channel, delivery_tag, forward):
        if forward.kind.value in failing:
            raise struct.error("ubyte format requires 0 <= number <= 255")
        sent.append(forward.kind.value)

    forwarder.send = send  # forward() must go through send
    bare = Forward("dead", amqp.Message(b""), None, OutcomeKind.DEAD_LETTERED)
    failing = {"retried"}
    forwarder.forward(Channel(), 7, Forward("delay", amqp.Message(b""), None, OutcomeKind.RETRIED), lambda reason: bare)
    assert sent == ["dead_lettered"] and rejected == []
    failing = {"retried", "dead_lettered"}
    forwarder.forward(Channel(), 8, Forward("delay", amqp.Message(b""), None, OutcomeKind.RETRIED), lambda reason: bare)
    assert rejected == [(8, False)]


def test_a_name_too_long_to_send_is_the_callers_error_and_later_confirms_still_match(broker_url, service):
    from amqprpc.testing import running_worker

    service.handler("touch")(lambda payload: None)
    with running_worker(service, broker_url=broker_url), RpcClient("hostile-names", broker_url=broker_url) as client:
        with pytest.raises(ValueError, match="cannot be sent"):
            client.call("s" * 300, "echo", timeout=5)
        with pytest.raises(ValueError, match="cannot be sent"):
            client.publish_event("e" * 300, {}, timeout=5)
        for _ in range(3):  # each confirmed as its own: the refused publish took no confirm number
            client.cast(service.name, "touch", {}, timeout=5)
        with pytest.raises(ServiceUnavailable, match="no queue is bound"):
            client.cast(f"{service.name}-nobody", "touch", {}, timeout=5)


def test_dlq_listing_survives_failure_times_that_are_no_time():
    from amqprpc.ops.dlq import _when

    assert _when(1e300) is None and _when(-1e300) is None and _when(1.0).startswith("1970-01-01")


class Amended(Middleware):
    """Records what ``outcome_amended`` tells it."""

    def __init__(self):
        self.amended = []

    def outcome_amended(self, delivery, old, new):
        self.amended.append((delivery.handler, old.kind.value, new.kind.value, new.error_type))


def dead_letters_counted(service: str, reason: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("amqprpc_dead_letters_total", {"service": service, "reason": reason}) or 0.0


def test_a_reply_that_cannot_be_encoded_is_counted_as_a_dead_letter_not_as_a_reply(
        broker_url, service, raw, monkeypatch):
    from amqprpc.middleware.metrics import Metrics
    from amqprpc.testing import running_worker

    # The decoder refuses a correlation id that cannot travel back; a peer's that got past
    # it anyway (here: the check switched off) fails only when the reply is encoded.
    monkeypatch.setattr(envelope, "shortstr_problem", lambda name, value: None)
    service.handler("echo")(lambda payload: payload)
    amended = Amended()
    channel = raw.channel()
    reply_queue = channel.queue_declare("", exclusive=True).queue
    dead_queue = DEFAULT_TOPOLOGY.dead_queue_name(service.name)
    with running_worker(service, broker_url=broker_url, middleware=[Metrics(), amended]) as worker:
        publish(raw, channel, DEFAULT_TOPOLOGY.service_exchange, DEFAULT_TOPOLOGY.request_key(service.name),
                encode_properties({"reply_to": reply_queue}), request(correlation_id="c" * 256))
        wait_for(lambda: count(raw, dead_queue) == 1, timeout=15)
        stats = worker.stats
        [letter] = take_all(raw, dead_queue)
    assert h.headers_of(letter)[h.ERROR_TYPE] == "UnsendableReply"
    assert (stats["succeeded"], stats["failed"], stats["dead_lettered"]) == (0, 1, 1)
    assert amended.amended == [("echo", "replied", "dead_lettered", "UnsendableReply")]
    assert dead_letters_counted(service.name, "UnsendableReply") == 1
    assert count(raw, reply_queue) == 0


def test_a_retry_copy_that_cannot_be_encoded_is_counted_as_the_dead_letter_it_became(broker_url, service, raw):
    from amqprpc import Retry
    from amqprpc.middleware.metrics import Metrics
    from amqprpc.testing import running_worker

    def flaky(payload):
        raise ConnectionError("not now")

    service.handler("flaky", retry=Retry(max_attempts=3, base_delay=0.01, jitter=False))(flaky)
    amended = Amended()
    dead_queue = DEFAULT_TOPOLOGY.dead_queue_name(service.name)
    with running_worker(service, broker_url=broker_url, middleware=[Metrics(), amended]) as worker, \
            RpcClient("hostile-copies", broker_url=broker_url) as client:
        send = worker.forwarder.send

        def send_but_retries(consume_channel, delivery_tag, forward):  # as py-amqp fails on a header it cannot write
            if forward.kind.value == "retried":
                raise struct.error("ubyte format requires 0 <= number <= 255")
            send(consume_channel, delivery_tag, forward)

        worker.forwarder.send = send_but_retries
        client.cast(service.name, "flaky", {}, timeout=5)
        wait_for(lambda: count(raw, dead_queue) == 1, timeout=15)
        wait_for(lambda: worker.forwarder.stats["dead_lettered"] == 1)
        stats = worker.stats
        [letter] = take_all(raw, dead_queue)
    assert h.headers_of(letter)[h.ERROR_TYPE] == "UnencodableCopy"
    assert (stats["failed"], stats["retried"], stats["dead_lettered"]) == (1, 0, 1)
    assert amended.amended == [("flaky", "retried", "dead_lettered", "UnencodableCopy")]
    assert dead_letters_counted(service.name, "UnencodableCopy") == 1
