"""Running the worker's own dispatcher in-process, for the test doubles.

:class:`~amqprpc.testing.inmemory.InMemoryClient` and
:func:`~amqprpc.testing.fake.worker_factory` build requests as a client would
(:func:`request_message`) and let :func:`carry_out` do what a worker and the broker do with
each decision: a retry (or a recount) runs again at once, without its backoff wait; a
message put off (rate limit, ETA) runs again after a short wait; a reply or a dead letter
ends it.
"""
from __future__ import annotations

import contextvars
import functools
import time
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import amqp

from amqprpc.middleware import Hooks
from amqprpc.outcome import OutcomeKind
from amqprpc.server.dispatcher import Decision, Dispatcher
from amqprpc.server.events import event_consumers
from amqprpc.service import Handler, Service
from amqprpc.transport.redelivery import Redelivery
from amqprpc.wire import envelope
from amqprpc.wire.topology import DEFAULT_TOPOLOGY

MAX_FORWARDS = 1000  # a message forwarded more often than this is a loop
MAX_MESSAGE_BYTES = 1 << 20  # the worker's defaults
MAX_REPLY_BYTES = 16 << 20


def request_message(*, message_id: str, source: str, service: str, kind: str, action: str, payload: Any,
                    headers: Mapping[str, Any], consumer_tag: Optional[str] = None) -> amqp.Message:
    """The message a client publishes for a ``kind`` ("call", "submit", "cast" or
    "event") and its worker receives (delivery_info as the broker fills it in)."""
    reply_to = None if kind in ("cast", "event") else "in-memory"
    body = envelope.request_body(message_id=message_id, source=source, target=None if kind == "event" else service,
                                 action=action, payload=payload, reply_to=reply_to, headers=headers)
    message = amqp.Message(body, content_type=envelope.CONTENT_TYPE, message_id=message_id,
                           correlation_id=message_id if reply_to else None, reply_to=reply_to,
                           application_headers={})
    message.delivery_info = {"consumer_tag": consumer_tag, "redelivered": False,
                             "exchange": "event.exchange" if kind == "event" else "service.exchange",
                             "routing_key": action if kind == "event" else f"request.{service}"}
    return message


def carry_out(dispatcher: Dispatcher, message: amqp.Message,
              run: Callable[[Callable[[], Decision]], Decision] = lambda dispatch: dispatch()) -> Decision:
    """Dispatch ``message`` until its decision is final (a reply, an ack, a dead letter or a
    discard) and return that decision; each dispatch in a context of its own (nothing a
    handler sets outlives it), through ``run`` (which may install what the handlers need)."""
    delivery_info = message.delivery_info
    for _ in range(MAX_FORWARDS):
        message.delivery_info = delivery_info
        decision = contextvars.copy_context().run(run, functools.partial(dispatcher.dispatch, message))
        forward = decision.forward
        if forward is None or forward.kind is OutcomeKind.DEAD_LETTERED:
            return decision
        if forward.kind not in (OutcomeKind.RETRIED, OutcomeKind.RECOUNTED):
            time.sleep(dispatcher.redelivery.topology.delay_bucket_ms(0) / 1000.0)  # put off: wait a little
        message = forward.message
    raise RuntimeError(f"{dispatcher.service.name}: a message was forwarded {MAX_FORWARDS} times")


def local_dispatcher(service: Service, hooks: Hooks, owner: Any,
                     builtins: Optional[Mapping[str, Handler]] = None) -> Tuple[Dispatcher, Dict[str, str]]:
    """A dispatcher for ``service`` as its worker makes one (default topology), and its
    event handlers' consumer tags by handler name (what :func:`request_message` takes)."""
    consumers = event_consumers(service, DEFAULT_TOPOLOGY, f"in-memory.{service.name}")
    dispatcher = Dispatcher(service, queue_name=DEFAULT_TOPOLOGY.request_queue_format.format(service=service.name),
                            redelivery=Redelivery(service.name, DEFAULT_TOPOLOGY), hooks=hooks,
                            event_consumers=consumers, builtins=builtins, max_message_bytes=MAX_MESSAGE_BYTES,
                            max_reply_bytes=MAX_REPLY_BYTES, owner=owner)
    return dispatcher, {consumer.subscription.name: tag for tag, consumer in consumers.items()}
