"""Credentials never reach output; log lines carry the request's identifiers."""
import io
import json

import pytest

from amqprpc import logs
from amqprpc.config import redact


@pytest.mark.parametrize("text, expected", [
    ("amqp://guest:guest@localhost:5672//", "amqp://guest:***@localhost:5672//"),
    ("amqps://u:s3cr%40t@h1:5671/v;amqp://u:p@h2//", "amqps://u:***@h1:5671/v;amqp://u:***@h2//"),
    ("error connecting to redis://:hunter2@cache:6379/0", "error connecting to redis://:***@cache:6379/0"),
    ("no url here", "no url here"),
])
def test_redact_hides_passwords(text, expected):
    assert redact(text) == expected


def test_json_log_lines_are_redacted_and_carry_request_fields():
    stream = io.StringIO()
    logs.configure("json", "info", stream=stream)
    try:
        logs.bind_request(service="user-service", action="get_user", correlation_id="c1", trace_id="t1")
        logs.get_logger("t").warning("failed", error="cannot reach amqp://bob:topsecret@broker//")
    finally:
        logs.clear_request()
        logs.configure("console", "warning")
    line = json.loads(stream.getvalue().splitlines()[-1])
    assert "topsecret" not in stream.getvalue()
    assert line["error"] == "cannot reach amqp://bob:***@broker//"
    assert {k: line[k] for k in ("service", "action", "correlation_id", "trace_id")} == \
        {"service": "user-service", "action": "get_user", "correlation_id": "c1", "trace_id": "t1"}
