"""Casts with a countdown or ETA never run early (``x-eta``), and what waits is counted.

A delayed cast reaches the request queue when its countdown queue's TTL runs out
(:mod:`amqprpc.client.countdown`): rounded up, so on time by the publisher's clock. A worker
whose clock runs ahead of the publisher's may still see it early; then it goes back to wait
for the rest, in the broker (never held unacked, never a sleeping handler thread). A message
without ``x-eta`` costs nothing: the worker's chain skips this scope for it (``consume_gate``).

:func:`wait_in_broker` is the one way the features of tasks in time put a delivery off:
through the countdown queue of the delay (50 ms steps under 10 s), headers updated.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from amqprpc import logs
from amqprpc.client.countdown import ETA_HEADER
from amqprpc.middleware import Delivery, Middleware
from amqprpc.outcome import Outcome, OutcomeKind
from amqprpc.retry import attempts_made
from amqprpc.server.dispatcher import Decision

log = logs.get_logger("amqprpc.eta")

# Early by less than this runs now (the broker's TTL timer and the clocks are not finer).
TOLERANCE_S = 0.005

# delivery.state key the metrics read: "countdown" (a delayed cast came due) or "periodic" (a tick).
TIMING = "amqprpc.timing"


def count(delivery: Delivery, name: str) -> None:
    """Add one to the worker's ``stats[name]`` (when the delivery has a worker that counts)."""
    add = getattr(delivery.worker, "count", None)
    if add is not None:
        add(name)


def wait_in_broker(delivery: Delivery, delay: float, kind: OutcomeKind,
                   update: dict[str, Any] | None = None) -> Decision:
    """The delivery back into its queue after ``delay`` seconds, waiting in the broker, with
    ``update`` merged into its headers; acked here once the broker has the copy."""
    forward = delivery.decide.redelivery.wait(delivery.message, delivery.queue, delay, kind, update)
    return Decision(forward=forward, outcome=Outcome(kind, None, time.perf_counter() - delivery.started))


class Eta(Middleware):
    """Sends a delivery whose ``x-eta`` is still ahead back to wait; counts those that came due."""

    consume_gate = (("headers", ETA_HEADER),)  # the chain skips this scope for a message without one

    def consume_scope(self, call_next: Callable[[Delivery], Any], delivery: Delivery) -> Any:
        eta = delivery.headers.get(ETA_HEADER)
        if eta is None:
            return call_next(delivery)
        try:
            early = float(eta) - time.time()
        except (TypeError, ValueError):
            return call_next(delivery)  # not ours to judge: run it
        if early > TOLERANCE_S:
            log.info("came before its eta; waits for the rest", early_by=round(early, 3),
                     message_id=delivery.message_id)
            return wait_in_broker(delivery, early, OutcomeKind.DELAYED)
        if not attempts_made(delivery.headers) and "x-rate-slot" not in delivery.headers:
            delivery.state[TIMING] = "countdown"
            count(delivery, "countdown_due")
        return call_next(delivery)
