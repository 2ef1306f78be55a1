"""The wire envelope: what we send is the article's format; what we accept is JSON only."""
import json

import pytest

from amqprpc.wire import envelope
from amqprpc.errors import BadMessage

JSON = {"content_type": "application/json"}


def valid(**overrides):
    doc = {"message_id": "m1", "source_service": "order-service", "target_service": "user-service",
           "action": "get_user", "timestamp": 1, "correlation_id": "c1", "reply_to": "q1", "headers": {},
           "payload": {"user_id": "u1"}}
    doc.update(overrides)
    return json.dumps(doc).encode()


def test_request_body_has_exactly_the_article_fields():
    body = envelope.request_body(message_id="m1", source="a", target="b", action="x", payload={"k": 1},
                                 reply_to="q", headers={"trace_id": "t"})
    doc = json.loads(body)
    assert set(doc) == {"message_id", "source_service", "target_service", "action", "timestamp",
                        "correlation_id", "reply_to", "headers", "payload"}
    assert doc["correlation_id"] == doc["message_id"] == "m1"
    assert isinstance(doc["timestamp"], int)


def test_decode_takes_reply_to_and_correlation_from_body_when_properties_lack_them():
    request = envelope.decode_request(valid(), JSON)
    assert (request.action, request.payload, request.reply_to, request.correlation_id) == \
        ("get_user", {"user_id": "u1"}, "q1", "c1")


def test_properties_win_over_body_for_reply_address():
    request = envelope.decode_request(valid(), {**JSON, "reply_to": "pq", "correlation_id": "pc"})
    assert (request.reply_to, request.correlation_id) == ("pq", "pc")


@pytest.mark.parametrize("body, properties, reason", [
    (b"{not json", JSON, "Malformed JSON"),
    (b"[1, 2]", JSON, "must be a JSON object"),
    (valid(action=None), JSON, "no action"),
    (json.dumps({"action": "x"}).encode(), JSON, "no payload"),
    (valid(payload=[1]), JSON, "Payload must be a JSON object"),
    (valid(headers="x"), JSON, "headers must be a JSON object"),
    (b"\x80\x04K\x01.", {"content_type": "application/x-python-serialize"}, "Unsupported content type"),
    (valid(), {"content_type": "application/x-yaml"}, "Unsupported content type"),
])
def test_bad_messages_are_refused_with_a_reason(body, properties, reason):
    with pytest.raises(BadMessage, match=reason):
        envelope.decode_request(body, properties)


def test_oversized_body_is_refused_before_parsing():
    with pytest.raises(BadMessage, match="too large"):
        envelope.decode_request(valid(payload={"blob": "x" * 2000}), JSON, max_bytes=1000)


def test_reply_address_survives_a_body_that_is_not_json():
    assert envelope.reply_address({"reply_to": "q", "correlation_id": "c"}, b"\xff\xfe") == ("q", "c")
    assert envelope.reply_address({}, valid()) == ("q1", "c1")
    assert envelope.reply_address({}, b"garbage") == (None, None)


def test_replies_have_the_article_shape():
    assert json.loads(envelope.ok_reply({"a": 1}, "m1")) == {"success": True, "data": {"a": 1}, "message_id": "m1"}
    assert json.loads(envelope.error_reply("boom", "ValueError", "m1")) == \
        {"success": False, "error": "boom", "error_type": "ValueError", "message_id": "m1"}


def test_an_error_reply_carries_a_validation_errors_list_bounded_in_entries_and_text():
    errors = [{"loc": f"items.{n}.quantity", "msg": "Input should be greater than 0", "type": "greater_than"}
              for n in range(60)]
    errors[0] = {"loc": "k" * 10_000, "msg": "m" * 10_000, "type": None, "input": "not carried"}
    doc = json.loads(envelope.error_reply("Invalid payload (60 errors): ...", "ValidationError", "m1", errors))
    assert set(doc) == {"success", "error", "error_type", "message_id", "errors"}
    assert len(doc["errors"]) == envelope.MAX_REPLY_ERRORS == 50
    assert doc["errors"][0] == {"loc": "k" * 300, "msg": "m" * 300, "type": ""}
    assert doc["errors"][1] == {"loc": "items.1.quantity", "msg": "Input should be greater than 0",
                                "type": "greater_than"}
    assert "errors" not in json.loads(envelope.error_reply("boom", "KeyError", "m2"))  # the article's shape


def test_an_error_reply_becomes_a_remote_error_and_a_validation_error_keeps_its_list():
    from amqprpc import RemoteError, RemoteValidationError, ValidationError

    refused = envelope.remote_error(json.loads(envelope.error_reply(
        "Invalid payload (1 error): a: Field required", "ValidationError", "m1",
        [{"loc": "a", "msg": "Field required", "type": "missing"}])))
    assert isinstance(refused, RemoteValidationError) and isinstance(refused, RemoteError)
    assert isinstance(refused, ValidationError) and refused.error_type == "ValidationError"
    assert refused.errors == [{"loc": "a", "msg": "Field required", "type": "missing"}]
    assert refused.message_id == "m1" and str(refused) == "ValidationError: Invalid payload (1 error): a: Field required"
    # A peer (PHP...) that sends no list, or a malformed one: still a ValidationError, the list what can be read.
    bare = envelope.remote_error({"success": False, "error": "bad", "error_type": "ValidationError"})
    assert isinstance(bare, RemoteValidationError) and bare.errors == []
    odd = envelope.remote_error({"success": False, "error": "bad", "error_type": "ValidationError",
                                 "errors": ["x", {"loc": ["a", 0], "msg": 5}]})
    assert odd.errors == [{"loc": "['a', 0]", "msg": "5", "type": ""}]
    other = envelope.remote_error({"success": False, "error": "no", "error_type": "KeyError", "errors": [{}]})
    assert type(other) is RemoteError and other.error_type == "KeyError"


def test_unserializable_results_raise_rather_than_produce_invalid_json():
    with pytest.raises(TypeError):
        envelope.ok_reply(object(), "m")
    with pytest.raises(ValueError):
        envelope.ok_reply(float("nan"), "m")


def test_ids_are_unique_hex():
    ids = {envelope.new_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) == 32 for i in ids)


# What orjson (when installed) reads or writes differently from the stdlib goes through the
# stdlib: the envelope's answer is the same with either library.
EDGE_BODIES = [b'{"a":1,"a":2}', b'1e400', b'[NaN, Infinity]', b'"\\ud800"', b'123456789012345678901234567890',
               b'{"id": 18446744073709551616, "n": -9223372036854775809}', b'\xef\xbb\xbf{}', b'{"a":-0.0}',
               b' {"a" : [1, 2.5e-7, true, null]} ', b'[' * 3000 + b']' * 3000, b'"\\u0000\\n"', b'{"x":"\xff"}',
               b'[1,]', b'', b'{"s": "caf\xc3\xa9 \xe2\x80\xa8"}', "{\"str\": 1}"]
EDGE_OBJECTS = [{"n": float("nan")}, {"n": float("inf")}, {"big": 2 ** 70}, {1: "int key"}, {"s": "\ud800"},
                {"none": None}, {"nested": [[[[1]]]] * 3}, {"f": 1e16, "g": 1e-7, "h": 0.1 + 0.2}, {"t": (1, 2)},
                {"u": "ünï \u2028 \x00"}, {"deep": json.loads("[" * 300 + "]" * 300)}, {"b": True, "z": False}]


def _stdlib(monkeypatch):
    monkeypatch.setattr(envelope, "orjson", None)
    monkeypatch.setattr(envelope, "_decode", envelope._json_loads)


def _outcome(fn, arg):
    try:
        result = fn(arg)
    except RecursionError:
        return "RecursionError"
    except (ValueError, TypeError):
        return "refused"
    return json.loads(result) if isinstance(result, bytes) else result


@pytest.mark.skipif(envelope.orjson is None, reason="orjson is not installed")
def test_orjson_reads_and_writes_what_the_stdlib_does(monkeypatch):
    fast = [repr(_outcome(envelope.loads, body)) for body in EDGE_BODIES]
    fast_out = [repr(_outcome(envelope.dumps, obj)) for obj in EDGE_OBJECTS]
    _stdlib(monkeypatch)
    assert fast == [repr(_outcome(envelope.loads, body)) for body in EDGE_BODIES]
    assert fast_out == [repr(_outcome(envelope.dumps, obj)) for obj in EDGE_OBJECTS]
    assert envelope.loads(b'{"id": 123456789012345678901234567890}')["id"] == 123456789012345678901234567890
