"""One publisher-confirm channel of a client, and what it still owes its callers.

The broker numbers the confirms of a channel by the publishes *that channel* received, so
what waits for a confirm is kept per channel (:class:`ConfirmedChannel`), and each channel's
acks and nacks go to its own entries. When a channel is replaced (the broker kept refusing
its publishes, or closed it), the confirms that arrive while it closes still find their
own entries, and whatever it never confirmed is handed back (:meth:`ConfirmedChannel.unconfirmed`)
to be failed at once -- not left to wait for a deadline, nor matched against the numbers
of the channel that replaced it.

What the client does with an entry (fail a call, resolve a cast) is its own: the channel
only numbers, publishes and sorts out confirms.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Generic, TypeVar

import amqp

from amqprpc.errors import AccessRefused, ConnectionLost, MessageTooLarge, ServiceUnavailable
from amqprpc.transport.channels import reason
from amqprpc.transport.ioloop import UNENCODABLE, channel_refused, close_quietly, open_confirm_channel, publish

Entry = TypeVar("Entry")

# A content header frame: 7-byte frame header, class id, weight and body size (12 bytes),
# the properties, the frame-end octet.
HEADER_FRAME_OVERHEAD = 20
# RabbitMQ's default max_message_size: 128 MiB up to 3.13, 16 MiB from 4.0.
MAX_MESSAGE_SIZE_3 = 128 * 1024 * 1024
MAX_MESSAGE_SIZE_4 = 16 * 1024 * 1024


def default_max_message_size(server_properties: dict[str, Any]) -> int:
    """The broker's default ``max_message_size`` for the version it announces."""
    version = server_properties.get("version", b"")
    version = version.decode() if isinstance(version, bytes) else str(version)
    major = version.split(".", 1)[0]
    return MAX_MESSAGE_SIZE_3 if major.isdigit() and int(major) < 4 else MAX_MESSAGE_SIZE_4


def check_size(message: amqp.Message, max_properties: int, max_body: int, what: str) -> None:
    """Raise :class:`MessageTooLarge` when the broker would refuse ``message`` for its size.
    The properties are serialized only when it has headers: without them they are a few
    short strings, far below the smallest frame_max (4096)."""
    body = len(message.body)
    if body > max_body:
        raise MessageTooLarge(f"{what}: the body is {body} bytes; the broker takes at most {max_body} "
                              "(max_message_size): nothing was sent", "body", body, max_body)
    if message.properties.get("application_headers"):
        size = len(message._serialize_properties())
        if size > max_properties:
            raise MessageTooLarge(f"{what}: the headers are {size} bytes; one frame holds {max_properties} "
                                  "(frame_max): nothing was sent", "headers", size, max_properties)


class ConfirmedChannel(Generic[Entry]):
    """A confirm channel of ``connection``; ``on_ack(entries)`` and ``on_nack(entries)`` get
    the entries the broker confirmed or refused (loop thread), ``on_return`` the mandatory
    publishes it could not route (before their ack). Publishing happens under the loop's
    write lock (the numbering and the publish in one hold)."""

    def __init__(self, connection: Any, on_ack: Callable[[list[Entry]], None],
                 on_nack: Callable[["ConfirmedChannel[Entry]", list[Entry]], None],
                 on_return: Callable[..., None], max_body: int):
        self._on_ack, self._on_nack = on_ack, on_nack
        self.max_body = max_body
        self.max_properties = connection.connection.frame_max - HEADER_FRAME_OVERHEAD
        self.entries: dict[int, Entry] = {}  # delivery tag -> what waits for its confirm
        self.seq = 0
        self.opened = time.monotonic()
        self.channel = open_confirm_channel(connection, self._ack, self._nack, on_return)

    @property
    def closed_by_broker(self) -> BaseException | None:
        """The broker's error when it closed this channel (:mod:`amqprpc.transport.channels`)."""
        return getattr(self.channel, "closed_by_broker", None)

    @property
    def refused_long_enough(self) -> bool:
        """After a nack: whether this channel is old enough to be replaced."""
        return channel_refused(self.opened)

    def publish(self, entry: Entry, message: amqp.Message, exchange: str, routing_key: str, mandatory: bool,
                what: str) -> None:
        """Number and send (under the write lock). Raises what the caller is to get when it
        could not be sent; nothing waits for a confirm then."""
        closed = self.closed_by_broker
        if closed is not None:
            raise closed_error(what, closed)
        check_size(message, self.max_properties, self.max_body, what)
        self.seq += 1
        self.entries[self.seq] = entry
        try:
            publish(self.channel, message, exchange, routing_key, mandatory=mandatory)
        except Exception as exc:  # noqa: BLE001 - sorted out below
            self.entries.pop(self.seq, None)
            if isinstance(exc, UNENCODABLE):
                self.seq -= 1  # nothing was sent: the broker's confirm numbers stay ours
                raise ValueError(f"{what}: cannot be sent: {exc}") from None
            closed = self.closed_by_broker  # closed by the broker while we were about to write
            if closed is not None:
                raise closed_error(what, closed) from None
            raise ConnectionLost(f"{what}: publish failed: {exc!r}") from None

    def take(self, delivery_tag: int, multiple: bool) -> list[Entry]:
        """The entries one confirm settles. Tags are added in increasing order, so a
        ``multiple`` scan stops at the first later one. No lock: each dict operation is
        atomic, and publishers only ever add larger tags."""
        entries = self.entries
        if not multiple:
            entry = entries.pop(delivery_tag, None)
            return [] if entry is None else [entry]
        taken = []
        for tag in list(entries):
            if tag > delivery_tag:
                break
            entry = entries.pop(tag, None)
            if entry is not None:
                taken.append(entry)
        return taken

    def close(self) -> list[Entry]:
        """Close it (loop thread; the confirms that arrive meanwhile are settled as usual)
        and return the entries it never confirmed."""
        close_quietly(self.channel)
        return self.unconfirmed()

    def unconfirmed(self) -> list[Entry]:
        """Take every entry still waiting (the channel is gone or going)."""
        entries, self.entries = self.entries, {}
        return list(entries.values())

    def _ack(self, delivery_tag: int, multiple: bool) -> None:
        taken = self.take(delivery_tag, multiple)
        if taken:
            self._on_ack(taken)

    def _nack(self, delivery_tag: int, multiple: bool) -> None:
        self._on_nack(self, self.take(delivery_tag, multiple))


def closed_error(what: str, error: BaseException) -> ServiceUnavailable:
    """What a caller gets for a publish on a channel the broker closed: 403 is a missing
    permission (:class:`AccessRefused`); anything else (404 no such exchange, 406 a body
    over the broker's ``max_message_size`` or a ``user_id`` not the connection's) is
    :class:`ServiceUnavailable` with the broker's words. Neither is retried: the same
    publish would be refused the same way until someone changes the broker's settings."""
    text = reason(error)
    if getattr(error, "reply_code", None) == 403:
        return AccessRefused(f"{what}: the broker refused it: {text}")
    return ServiceUnavailable(f"{what}: the broker refused it and closed the channel: {text}")
