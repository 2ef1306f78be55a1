"""Tasks in time (#22) without a broker: rates, schedules, countdown rounding and validation,
the GCRA limiter (in process, and in Redis where one runs)."""
from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest

from amqprpc import Service
from amqprpc.client.countdown import check_priority, delay_of
from amqprpc.middleware.ratelimit import LocalGcra, RateLimiter
from amqprpc.rate import parse_rate
from amqprpc.schedule import Schedule
from amqprpc.wire.topology import DEFAULT_TOPOLOGY


def test_rates_parse_and_refuse():
    assert parse_rate("20/s").interval == 0.05 and parse_rate("120/m").interval == 0.5
    assert parse_rate(" 5 / h ").period == 3600
    for bad in ("20", "0/s", "20/d", "x/s", ""):
        with pytest.raises(ValueError):
            parse_rate(bad)
    with pytest.raises(ValueError):
        Service("s").handler("a", rate_limit="fast")


def test_countdowns_are_rounded_up_into_few_queues():
    topology = DEFAULT_TOPOLOGY
    for seconds in (0.01, 0.25, 5, 9.99, 10.2, 59.2, 3599.5, 3601, 86400, 30 * 86400):
        ms = topology.countdown_ms(seconds)
        late = ms / 1000 - seconds
        assert late >= 0  # never early
        assert late <= (0.05 if seconds <= 10 else 1.0 if seconds <= 3600 else seconds * 0.005 + 1)
    assert len({topology.countdown_ms(3600 + s) for s in range(0, 3600)}) < 200  # ~0.5% steps above 1 h
    queue = topology.countdown_queue("service.x.request", 5000)
    assert queue.name == "service.x.request.countdown.5000"
    assert queue.queue_arguments["x-dead-letter-routing-key"] == "service.x.request"
    assert queue.queue_arguments["x-expires"] > 5000


def test_delays_are_checked():
    assert delay_of(None, None) is None and delay_of(5, None) == 5
    now = time.time()
    eta = datetime.fromtimestamp(now, timezone.utc) + timedelta(seconds=90)
    assert delay_of(None, eta, now) == pytest.approx(90)
    with pytest.raises(ValueError, match="timezone-aware"):
        delay_of(None, datetime.now())
    for countdown in (-1, float("nan"), 31 * 86400):
        with pytest.raises(ValueError):
            delay_of(countdown, None)
    with pytest.raises(ValueError):
        delay_of(1, eta)
    for priority in (-1, 256, 1.5, True):
        with pytest.raises(ValueError):
            check_priority(priority)  # type: ignore[arg-type]


def test_max_priority_is_checked_and_declared():
    for bad in (0, 11, "5"):
        with pytest.raises(ValueError):
            Service("s", max_priority=bad)  # type: ignore[arg-type]
    queue = DEFAULT_TOPOLOGY.request_queue("s", max_priority=5)
    assert queue.queue_arguments == {"x-max-priority": 5}
    assert DEFAULT_TOPOLOGY.request_queue("s").queue_arguments is None
    assert "x-max-priority" not in DEFAULT_TOPOLOGY.request_queue("s", "quorum", 7, 5).queue_arguments


def test_schedules_tick_on_shared_times_with_ids():
    service = Service("reports")
    every = service.periodic("cleanup", every=2, payload={"deep": True})
    at = datetime(2026, 1, 1, 12, 0, 1, tzinfo=timezone.utc)
    assert every.next_after(at) == datetime(2026, 1, 1, 12, 0, 2, tzinfo=timezone.utc)
    assert len(every.due_between(at, at + timedelta(seconds=10))) == 5
    assert every.tick_id(every.next_after(at)) == "cleanup@2026-01-01T12:00:02.000+00:00"
    cron = service.periodic("report", cron="0 9 * * *", tz="Europe/Berlin")
    cron.check()
    assert every.latest_until(at) == datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
    assert cron.latest_until(datetime(2026, 1, 2, 8, 0, tzinfo=timezone.utc)) == datetime(
        2026, 1, 2, 8, 0, tzinfo=timezone.utc)
    assert cron.next_after(at) == datetime(2026, 1, 2, 8, 0, tzinfo=timezone.utc)  # 09:00 CET
    with pytest.raises(ValueError, match="twice"):
        service.periodic("cleanup", every=5)
    for kwargs in ({}, {"every": 1, "cron": "* * * * *"}, {"every": 0}, {"cron": "* *"},
                   {"every": 1, "misfire": "all"}, {"every": 1, "tz": "Mars/Base"}):
        with pytest.raises(Exception):
            Schedule("x", "s", "a", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a valid cron"):
        Schedule("x", "s", "a", cron="61 * * * *").check()


def test_local_gcra_spaces_runs_at_the_rate():
    gcra, rate = LocalGcra(), parse_rate("20/s")
    waits = [gcra.reserve("k", rate) for _ in range(40)]
    assert waits[0] == 0 and waits[1] == pytest.approx(0.05, abs=0.01)
    assert waits[-1] == pytest.approx(39 * 0.05, abs=0.02)  # each reserves the next free slot


def dispatch_one(service: Service, middleware: list, headers: dict, message_id: str = "m-1"):
    """One cast of ``service``'s action "run" through the worker's own dispatcher."""
    from amqprpc.middleware import Hooks
    from amqprpc.testing.dispatch import local_dispatcher, request_message

    dispatcher, _ = local_dispatcher(service, Hooks(middleware, defaults=False), None)
    message = request_message(message_id=message_id, source="t", service=service.name, kind="cast",
                              action="run", payload={}, headers={})
    message.properties["application_headers"] = dict(headers)
    return dispatcher.dispatch(message)


def test_an_early_eta_goes_back_to_wait_in_a_countdown_queue():
    from amqprpc.middleware.eta import Eta
    from amqprpc.outcome import OutcomeKind

    service, ran = Service("eta-unit"), []
    service.handler("run")(lambda payload: ran.append(1))
    decision = dispatch_one(service, [Eta()], {"x-eta": time.time() + 2.0})
    assert decision.outcome.kind is OutcomeKind.DELAYED and not ran
    assert decision.forward.routing_key == "service.eta-unit.request.countdown.2000"
    assert decision.forward.message.properties["application_headers"]["x-eta"] > time.time()
    assert dispatch_one(service, [Eta()], {"x-eta": time.time() - 1}).outcome.kind is OutcomeKind.DONE and ran


def test_a_rate_limited_message_reserves_its_slot_once():
    from amqprpc.middleware.ratelimit import SLOT_HEADER, RateLimit, RateLimiter
    from amqprpc.outcome import OutcomeKind

    service, ran = Service("rate-unit"), []
    service.handler("run", rate_limit="2/s")(lambda payload: ran.append(1))
    limiter = RateLimiter("rate-unit", redis_url="redis://127.0.0.1:1/0", timeout=0.05)  # Redis down: alone
    middleware = [RateLimit(service, limiter)]
    assert dispatch_one(service, middleware, {}).outcome.kind is OutcomeKind.DONE
    put_off = dispatch_one(service, middleware, {})
    assert put_off.outcome.kind is OutcomeKind.RATE_LIMITED and limiter.redis_down and len(ran) == 1
    slot = put_off.forward.message.properties["application_headers"][SLOT_HEADER]
    assert put_off.forward.routing_key.endswith(".countdown.500")
    # Back when its slot came: runs without a second reservation (the limiter would say wait).
    assert dispatch_one(service, middleware, {SLOT_HEADER: f"0:{time.time()}"}).outcome.kind is OutcomeKind.DONE
    assert slot.startswith("0:") and len(ran) == 2


def test_a_tick_runs_once_and_without_redis_at_least_once():
    from amqprpc.middleware.ticks import TickOnce
    from amqprpc.outcome import OutcomeKind

    service, ran = Service("tick-unit"), []
    service.handler("run")(lambda payload: ran.append(1))
    claimed: set = set()

    class Claims:  # Redis' SET NX, in a set
        def set(self, key, value, nx, ex):
            if key in claimed:
                return None
            claimed.add(key)
            return True

    once = [TickOnce("tick-unit", redis=Claims())]
    tick = {"x-tick": "run"}
    kinds = [dispatch_one(service, once, tick, "run@2026-01-01T00:00:00.000+00:00").outcome.kind for _ in range(2)]
    assert kinds == [OutcomeKind.DONE, OutcomeKind.DEDUPLICATED] and len(ran) == 1
    # The same copy again after a crash (recounted by the worker: x-deliveries), not a duplicate.
    recounted = dispatch_one(service, once, {**tick, "x-deliveries": 1}, "run@2026-01-01T00:00:00.000+00:00")
    assert recounted.outcome.kind is OutcomeKind.DONE and len(ran) == 2
    down = [TickOnce("tick-unit", redis_url="redis://127.0.0.1:1/0")]
    assert [dispatch_one(service, down, tick, "run@x").outcome.kind for _ in range(2)] == [OutcomeKind.DONE] * 2
