"""Channels the broker closes stay closed, and their owner hears of it.

RabbitMQ closes a channel (not the connection) for what one channel did: an unacked
delivery held past ``consumer_timeout`` (406 PRECONDITION_FAILED, 30 min by default), a
publish to an exchange the user may not write to (403 ACCESS_REFUSED), a declare that
does not match (406), a publish to a missing exchange (404 NOT_FOUND). py-amqp's
``Channel._on_close`` answers Close-Ok, then *revives* the channel (opens it again under
the same id, without its consumers and without confirm mode) and raises. Raised from a
frame dispatched by the loop, the error used to be lost with the loop's "nothing more to
read" signal (see :mod:`amqprpc.transport.framereader`), leaving a worker running with no
consumer and a client publishing on a channel without confirms: nothing logged, the queue
filling up, calls timing out.

:func:`install` gives a connection channels of :class:`ClosableChannel` instead: one the
broker closes answers Close-Ok and is torn down (its id freed), never revived. Then:

- a thread waiting on that channel for a reply (a declare, a consume) gets the broker's
  error raised, as before (a mismatching declare is still a ``PreconditionFailed``);
- ``closed(channel, error)`` is called, on the loop thread inside the frame's dispatch:
  the loop logs it and lets the channel's owner replace it (see ``AmqpLoop``).

The broker requeues what was delivered unacked on the closed channel; an ack sent later
under its old delivery tag would be an error on any other channel, so owners drop them
(``AmqpLoop.generation``).
"""
from __future__ import annotations

from typing import Any, Callable

import amqp
from amqp import spec
from amqp.exceptions import AMQPError, ChannelError, error_for_code

# What the loop is told when the broker closed one of its channels.
ClosedCallback = Callable[["ClosableChannel", AMQPError], None]

# Called with the reply code of every channel the broker closes, in this process (the
# Prometheus metrics count them there: amqprpc.middleware.metrics).
close_listeners: list[Callable[[int], None]] = []


class ClosableChannel(amqp.Channel):  # type: ignore[misc, unused-ignore]  # (strict: subclassing Any)
    """A py-amqp channel that stays closed when the broker closes it (see the module)."""

    closed_by_broker: AMQPError | None = None
    closed_id = 0  # its id, once closed by the broker (``channel_id`` is None then)
    on_closed: ClosedCallback | None = None

    def _on_close(self, reply_code: int, reply_text: str, class_id: int, method_id: int) -> None:
        connection = self.connection
        if connection is None or connection.is_closing or self.is_closing:
            # Our own close crossed the broker's: py-amqp's handling is right for that.
            super()._on_close(reply_code, reply_text, class_id, method_id)
            return
        self.send_method(spec.Channel.CloseOk)
        error = error_for_code(reply_code, reply_text, (class_id, method_id), ChannelError)
        waiting = bool(self._pending)  # a method of this channel waits for its reply
        self.closed_by_broker, self.closed_id = error, self.channel_id
        self.collect()  # not open any more; its id is free for the next channel
        for listener in close_listeners:
            listener(reply_code)
        if self.on_closed is not None:
            self.on_closed(self, error)
        if waiting:
            raise error


def install(connection: Any, on_closed: ClosedCallback) -> None:
    """Open this py-amqp connection's channels as :class:`ClosableChannel`, telling
    ``on_closed(channel, error)`` when the broker closes one. Before
    :func:`amqprpc.transport.framehandler.install`, which wraps ``connection.Channel``."""
    # Below the connection's own class (kombu's adds what its entities call on a channel).
    channel_class = type("ClosableChannel", (ClosableChannel, connection.Channel),
                         {"on_closed": staticmethod(on_closed)})
    connection.Channel = channel_class


def reason(error: BaseException) -> str:
    """The broker's words for a channel it closed: ``403 ACCESS_REFUSED - access to ...``."""
    if isinstance(error, AMQPError) and error.reply_code:
        return f"{error.reply_code} {error.reply_text}"
    return f"{type(error).__name__}: {error}"


def open_confirm_channel(connection: Any, on_ack: Callable[..., Any], on_nack: Callable[..., Any],
                         on_return: Callable[..., Any] | None = None) -> amqp.Channel:
    """A new channel of ``connection`` in publisher-confirm mode, with its handlers of the
    broker's acks, nacks and (for mandatory publishes) returns."""
    channel = connection.channel()
    channel.confirm_select()
    channel.events["basic_ack"].add(on_ack)
    channel.events["basic_nack"].add(on_nack)
    if on_return is not None:
        channel.events["basic_return"].add(on_return)
    return channel


def close_quietly(channel: amqp.Channel | None) -> None:
    """Close a channel being replaced; if that fails the connection's fate decides."""
    if channel is None:
        return
    try:
        channel.close()
    except Exception:  # noqa: BLE001 - a broken channel or connection: nothing to save
        pass
