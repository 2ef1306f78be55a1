"""Operators' view of a service's dead letters: inspect, replay, purge (``amqprpc dlq``).

Short-lived, synchronous connections: this is a command run by a person, not a hot path.
Looking never consumes: messages are fetched unacked and go back (to their places) when
the channel closes. Replaying publishes each copy with publisher confirms *before* acking
the dead letter, so a replay interrupted half-way loses nothing (at worst one duplicate).
"""
from __future__ import annotations

import contextlib
import datetime
from typing import Any, Iterator

import amqp
from kombu import Connection

from amqprpc.wire import envelope
from amqprpc import retry as h
from amqprpc.config import broker_url as default_broker_url
from amqprpc.config import ssl_options
from amqprpc.wire.topology import DEFAULT_TOPOLOGY, Topology


@contextlib.contextmanager
def _channel(broker_url: str | None) -> Iterator[amqp.Channel]:
    url = default_broker_url(broker_url)
    with Connection(url, connect_timeout=5, ssl=ssl_options(url)) as conn:
        channel = conn.channel()
        try:
            yield channel
        finally:
            with contextlib.suppress(Exception):
                channel.close()


def _count(broker_url: str | None, queue: str) -> int:
    """Letters waiting in ``queue``; 0 when it does not exist (a worker declares it with the
    first dead letter, so a service that never failed has none). Its own channel: a
    passive declare of a missing queue closes the channel it ran on."""
    with _channel(broker_url) as channel:
        try:
            count: int = channel.queue_declare(queue, passive=True).message_count
            return count
        except amqp.exceptions.NotFound:
            return 0


def describe(message: amqp.Message) -> dict[str, Any]:
    """One dead letter as plain JSON-able data: ids, action, why, when, where from."""
    headers = h.headers_of(message)
    try:
        doc = envelope.loads(message.body)
        action = doc.get("action") if isinstance(doc, dict) else None
    except (ValueError, TypeError, RecursionError):
        action = None
    return {
        "message_id": message.properties.get("message_id"),
        "correlation_id": message.properties.get("correlation_id"),
        "action": action if isinstance(action, str) else None,
        "error": _plain(headers.get(h.ERROR)),
        "error_type": _plain(headers.get(h.ERROR_TYPE)),
        "attempts": h.attempts_made(headers),
        "first_failure": _when(headers.get(h.FIRST_FAILURE)),
        "last_failure": _when(headers.get(h.LAST_FAILURE)),
        "original_exchange": _plain(headers.get(h.ORIGINAL_EXCHANGE)),
        "original_routing_key": _plain(headers.get(h.ORIGINAL_ROUTING_KEY)),
        "original_queue": _plain(headers.get(h.ORIGINAL_QUEUE)),
        "bytes": len(message.body),
    }


def inspect(service: str, limit: int = 10, *, broker_url: str | None = None,
            topology: Topology = DEFAULT_TOPOLOGY) -> tuple[int, list[dict[str, Any]]]:
    """(how many dead letters ``service`` has, the first ``limit`` of them described)."""
    count, messages = peek(service, limit, broker_url=broker_url, topology=topology)
    return count, [describe(message) for message in messages]


def peek(service: str, limit: int = 10, *, broker_url: str | None = None,
         topology: Topology = DEFAULT_TOPOLOGY) -> tuple[int, list[amqp.Message]]:
    """(how many dead letters ``service`` has, the first ``limit`` of them as messages):
    fetched unacked and put back where they were, for a caller that wants their bodies."""
    queue = topology.dead_queue_name(service)
    count = _count(broker_url, queue)
    with _channel(broker_url) as channel:
        found = []
        for _ in range(min(limit, count)):
            message = channel.basic_get(queue, no_ack=False)
            if message is None:
                break
            found.append(message)
        # Closing the channel (unacked) puts them back where they were.
    return count, found


def replay(service: str, *, broker_url: str | None = None, topology: Topology = DEFAULT_TOPOLOGY,
           confirm_timeout: float = 10.0, message_id: str | None = None) -> tuple[int, int]:
    """Send every dead letter of ``service`` back to the queue it failed in, keeping its
    message id, correlation id and body, with a fresh retry budget. Only what was there
    when the replay began is replayed (a letter that fails again is not looped over).
    With ``message_id``, only the letter(s) with that id are (the others stay, in order):
    replaying an id that is no longer there replays nothing, so a repeated request is harmless.
    Returns (replayed, left in the dead queue because it could not be routed)."""
    queue = topology.dead_queue_name(service)
    replayed = unroutable = 0
    total = _count(broker_url, queue)
    with _channel(broker_url) as channel:
        returned: list[str] = []
        channel.events["basic_return"].add(lambda exc, exchange, key, msg: returned.append(key))
        channel.confirm_select()
        for _ in range(total):
            message = channel.basic_get(queue, no_ack=False)
            if message is None:
                break
            if message_id is not None and message.properties.get("message_id") != message_id:
                continue  # not the one asked for: requeued (in place) when the channel closes
            headers = h.headers_of(message)
            target = _plain(headers.get(h.ORIGINAL_QUEUE)) or topology.request_queue_format.format(service=service)
            copy = _fresh_copy(message)
            returned.clear()
            channel.basic_publish_confirm(copy, "", target, mandatory=True, confirm_timeout=confirm_timeout)
            if returned:
                unroutable += 1  # its queue is gone: keep the dead letter (requeued at close)
                continue
            channel.basic_ack(message.delivery_tag)
            replayed += 1
    return replayed, unroutable


def purge(service: str, *, broker_url: str | None = None, topology: Topology = DEFAULT_TOPOLOGY) -> int:
    """Empty ``service``'s dead-letter queue; returns how many letters were dropped."""
    queue = topology.dead_queue_name(service)
    if not _count(broker_url, queue):
        return 0
    with _channel(broker_url) as channel:
        return channel.queue_purge(queue) or 0


def _fresh_copy(message: amqp.Message) -> amqp.Message:
    headers = {k: v for k, v in (h.headers_of(message)).items() if k not in h.BOOKKEEPING}
    headers["x-replayed"] = h.int_header(h.headers_of(message), "x-replayed") + 1
    properties = {**message.properties, "application_headers": headers, "delivery_mode": 2}
    body = message.body
    return amqp.Message(body.encode() if isinstance(body, str) else body, **properties)  # "" when empty


def _plain(value: Any) -> Any:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _when(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:  # headers come from the wire: 1e300 is a float too
        return datetime.datetime.fromtimestamp(value, datetime.timezone.utc).isoformat(timespec="milliseconds")
    except (OverflowError, ValueError, OSError):
        return None
