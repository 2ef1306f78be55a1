"""Credentials never reach output; log lines carry the request's identifiers; and amqprpc is
a guest in the application's logging: nothing on stdout or stderr unless the application
configured logging, and then its records carry their fields for the application's formatter."""
import io
import json
import logging
import subprocess
import sys

import pytest

from amqprpc import logs
from amqprpc.config import redact
from amqprpc.testing import capture_logs, delete_queues, unique_name


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
    assert {k: line[k] for k in ("event", "level", "service", "action", "correlation_id", "trace_id")} == {
        "event": "failed", "level": "warning", "service": "user-service", "action": "get_user",
        "correlation_id": "c1", "trace_id": "t1"}


def test_a_record_carries_its_fields_as_attributes_and_in_its_message():
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("amqprpc.test").addHandler(handler)
    try:
        with capture_logs():  # lets debug through, whatever the process configured
            logs.bind_request(service="s", action="a", correlation_id="c", trace_id="t", parent_id=None)
            logs.get_logger("amqprpc.test").debug("100% handled", duration=0.5, name="not the logger's",
                                                   url="amqp://u:pw@h//")
    finally:
        logs.clear_request()
        logging.getLogger("amqprpc.test").removeHandler(handler)
    (record,) = records
    assert record.name == "amqprpc.test" and record.levelno == logging.DEBUG
    assert (record.event, record.service, record.action, record.correlation_id, record.trace_id, record.duration) == \
        ("100% handled", "s", "a", "c", "t", 0.5)
    assert record.parent_id is None and record.amqprpc_name == "not the logger's"  # LogRecord's own "name" kept
    assert record.getMessage() == ("100% handled duration=0.5 name=not the logger's url=amqp://u:***@h// "
                                   "service=s action=a correlation_id=c trace_id=t")
    assert record.funcName == "test_a_record_carries_its_fields_as_attributes_and_in_its_message"


# A script that uses amqprpc as a library: an in-process worker, a client, late replies, a
# failing handler, a cast to an unknown action, a breaker that opens. It prints one line of
# its own; with "configured" it first sets up logging with a JSON formatter of its own.
SCRIPT = r'''
import json, logging, sys, time
from amqprpc import CallTimeout, CircuitBreaker, CircuitOpen, RemoteError, RpcClient, Service, ServiceUnavailable
from amqprpc.testing import running_worker

name, mode = sys.argv[1], sys.argv[2]
if mode == "configured":
    class Json(logging.Formatter):
        def format(self, record):
            skip = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
            return json.dumps({"logger": record.name, "level": record.levelname, "message": record.getMessage(),
                               **{k: v for k, v in vars(record).items() if k not in skip}}, default=str)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(Json())
    logging.basicConfig(level=logging.DEBUG, handlers=[handler])
    logging.getLogger("amqp").setLevel(logging.WARNING)

service = Service(name)
service.handler("slow")(lambda payload: time.sleep(0.3) or "late")
service.handler("fail")(lambda payload: 1 / 0)
late = failed = opened = 0
with running_worker(service, concurrency=20), RpcClient("quiet") as client, \
        RpcClient("quiet", breaker=CircuitBreaker(failure_threshold=1, shared=False)) as guarded:
    for future in [client.call_async(name, "slow", {}, timeout=0.1) for _ in range(20)]:
        late += isinstance(future.exception(5), CallTimeout)
    try:
        client.call(name, "fail", {})
    except RemoteError:
        failed += 1
    client.cast(name, "no_such_action", {})
    for _ in range(2):
        try:
            guarded.call(name + "-nobody", "x", {})
        except CircuitOpen:
            opened += 1
        except ServiceUnavailable:
            pass
    time.sleep(0.5)  # the late replies arrive
print(json.dumps({"late": late, "failed": failed, "opened": opened}))
'''


def run_script(mode: str):
    name = unique_name("quiet")
    try:
        return subprocess.run([sys.executable, "-c", SCRIPT, name, mode], capture_output=True, text=True, timeout=90)
    finally:
        delete_queues(f"service.{name}.request", f"service.{name}.dead")


@pytest.mark.integration
def test_a_script_that_never_configured_logging_prints_only_its_own_output(broker_url):
    result = run_script("unconfigured")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert json.loads(result.stdout) == {"late": 20, "failed": 1, "opened": 1}  # the script's one line, nothing else


@pytest.mark.integration
def test_an_applications_own_json_formatter_gets_every_field(broker_url):
    result = run_script("configured")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"late": 20, "failed": 1, "opened": 1}
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    by_event = {}
    for line in lines:
        by_event.setdefault(line.get("event"), []).append(line)
    (failed,) = by_event["handler failed"]
    assert failed["logger"] == "amqprpc.worker" and failed["level"] == "WARNING"
    assert failed["action"] == "fail" and failed["error_type"] == "ZeroDivisionError"
    assert failed["correlation_id"] and failed["trace_id"] and failed["service"].startswith("quiet-")
    assert failed["message"].startswith("handler failed ") and "action=fail" in failed["message"]
    assert by_event["unknown action, dead-lettered"][0]["dead_letter_queue"].endswith(".dead")
    assert len(by_event["reply for no pending call (late or duplicate)"]) == 20
    assert by_event["circuit opened"][0]["logger"] == "amqprpc.breaker"
    assert {line["action"] for line in by_event["request handled"]} == {"slow"}
