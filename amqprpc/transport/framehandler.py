"""Frames to deliveries, surviving the deliveries py-amqp cannot decode.

py-amqp decodes a delivery's content header (its basic properties) in its frame handler,
on our loop thread: ``amqp.method_framing.frame_handler`` -> ``Message.inbound_header`` ->
``amqp.serialization.decode_properties_basic``. A property that is not valid UTF-8 (any
short string: content_type, correlation_id, reply_to, message_id, type, app_id, ...) or a
headers table it cannot read (a timestamp past year 9999, tables nested past Python's
recursion limit) raises there, and the handler is left expecting that content header
forever: the next frame is an ``UnexpectedFrame``, the connection is lost, the broker
redelivers the same message to the new connection, and so on. RabbitMQ routes such
messages: it checks only what it routes on.

So :func:`install` gives each connection :func:`frame_handler` instead. It does what
py-amqp's does, and when a content header does not decode it delivers an
:class:`UndecodableMessage`: the properties that could be read, the property bytes as
received and what went wrong. The consumer (worker, collector, client) dead-letters or
drops it; the connection stays up.

The same for the arguments of a content method: RabbitMQ routes a routing key that is not
UTF-8 through a topic exchange (``order.\\xff`` matches ``order.*``), which py-amqp fails
to decode in ``Channel.dispatch_method``. The delivery tag still reads, so the message is
delivered marked, with the strings that did not decode backslash-escaped. And frames for
a channel the connection does not have are dropped with a warning. And the connection's
channels never decode a body with a codec a peer chose (see :func:`install`).

Checked against py-amqp 5.1.1, 5.2.0, 5.3.1 and 5.4.2 (what ``kombu>=5.3`` allows): their
``frame_handler``, ``GenericContent.inbound_header``/``inbound_body``,
``Connection.blocking_read``/``on_inbound_method`` and ``Channel._on_basic_deliver`` are
the same in all four. Their table decoding differs (5.4 keeps a header key that is not
UTF-8 as bytes where older versions raise; ``s`` and ``l`` changed meaning), which changes
which deliveries end up here, not how they are caught.
"""
from __future__ import annotations

import functools
import struct
from struct import unpack_from
from typing import Any, Callable

import amqp
from amqp import spec
from amqp.exceptions import UnexpectedFrame
from amqp.serialization import dumps, loads

from amqprpc import logs

log = logs.get_logger("amqprpc.framehandler")

# Method (class id, method id) -> the names and py-amqp formats of its arguments.
_CONTENT_ARGS = {
    spec.Basic.Deliver: (("consumer_tag", "s"), ("delivery_tag", "L"), ("redelivered", "b"), ("exchange", "s"),
                         ("routing_key", "s")),
    spec.Basic.GetOk: (("delivery_tag", "L"), ("redelivered", "b"), ("exchange", "s"), ("routing_key", "s"),
                       ("message_count", "l")),
    spec.Basic.Return: (("reply_code", "B"), ("reply_text", "s"), ("exchange", "s"), ("routing_key", "s")),
}
_CONTENT_METHODS = frozenset(_CONTENT_ARGS)
_FIXED = {"o": ">B", "B": ">H", "l": ">I", "L": ">Q"}  # fixed-size fields: struct format
_SHOWN = 60  # bytes of an undecodable value quoted in the reason


class UndecodableMessage(amqp.Message):  # type: ignore[misc]
    """A delivery py-amqp could not decode.

    ``properties`` holds what did decode; ``problem`` says what did not;
    ``raw_properties`` is the content header's property flags and list as received
    (empty when only the method's arguments failed). ``delivery_info`` and ``body`` are
    those of any message (escaped strings where the arguments did not decode).
    """

    __slots__ = ("problem", "raw_properties")

    problem: str
    raw_properties: bytes


def install(connection: Any) -> None:
    """Use :func:`frame_handler` for this (connected, idle) py-amqp connection, and open
    its channels with ``auto_decode`` off.

    With ``auto_decode`` on (py-amqp's default) a channel decodes each body with the codec
    its ``content_encoding`` property names, on the loop thread: a peer could pick any text
    codec, slow ones included (punycode is quadratic). Bodies are JSON, which ``json.loads``
    reads from bytes itself.
    """
    connection.on_inbound_frame = frame_handler(connection, connection.on_inbound_method)
    connection.Channel = functools.partial(connection.Channel, auto_decode=False)


def frame_handler(connection: Any, callback: Callable[..., Any], unpack_from: Callable[..., Any] = unpack_from,
                  Message: type = amqp.Message, content_methods: frozenset[Any] = _CONTENT_METHODS
                  ) -> Callable[[tuple[Any, ...]], bool]:
    """py-amqp's frame handler contract: ``on_frame((type, channel, payload))`` returns
    True when it dispatched a method (``drain_events`` reads until one was). (Keyword
    defaults: locals are faster than globals on this, the hottest path.)"""
    expected: dict[int, int] = {}  # channel -> frame type due next, while a content is incomplete
    partial: dict[int, amqp.Message] = {}

    def on_frame(frame: tuple[Any, ...]) -> bool:
        frame_type, channel, buf = frame
        connection.bytes_recv += 1
        if frame_type == 1 and channel not in expected:
            method_sig = unpack_from(">HH", buf, 0)
            if method_sig in content_methods:
                partial[channel] = Message(frame_method=method_sig, frame_args=buf)
                expected[channel] = 2
                return False
            content = None
        elif frame_type == 8:
            return False
        else:
            due = expected.get(channel, 1)
            if frame_type != due:
                raise UnexpectedFrame(f"Received frame {frame_type} while expecting type: {due}")
            content = partial[channel]
            if frame_type == 2:
                try:
                    content.inbound_header(buf)
                except Exception as exc:  # noqa: BLE001 - anything in the header: this delivery's problem only
                    content = partial[channel] = _undecodable_header(content, buf, exc)
                if not content.ready:
                    expected[channel] = 3
                    return False
            else:
                content.inbound_body(buf)
                if not content.ready:
                    return False
            del expected[channel], partial[channel]
            method_sig, buf = content.frame_method, content.frame_args
        try:
            callback(channel, method_sig, buf, content)
        except Exception as exc:  # noqa: BLE001 - sorted out below; re-raised unless it is one of ours
            _redispatch(connection, callback, channel, method_sig, buf, content, exc)
        return True

    return on_frame


def _redispatch(connection: Any, callback: Callable[..., Any], channel: int, method_sig: tuple[Any, ...], args: bytes,
                content: amqp.Message | None, exc: Exception) -> None:
    """After the dispatch of a method raised: drop it if it was for a channel the
    connection does not have; deliver it marked if its arguments did not decode; else
    re-raise."""
    channels = connection.channels
    if isinstance(exc, KeyError) and channels is not None and channel not in channels:
        log.warning("frame for an unknown channel dropped", channel=channel, method=method_sig)
        return
    fields = _CONTENT_ARGS.get(method_sig)
    if fields is None or content is None or _args_decode(method_sig, args):
        raise exc  # (a method of _CONTENT_ARGS always comes with its content)
    values, problems = _lenient_args(fields, args)
    marked = _mark(content, "; ".join(problems) or f"{type(exc).__name__}: {exc}")
    callback(channel, method_sig, args[:4] + dumps("".join(kind for _, kind in fields), values), marked)


def lenient_properties(buf: bytes, offset: int = 0) -> tuple[dict[str, Any], list[str]]:
    """The basic properties at ``buf[offset:]`` (flags, then the list) that decode, and
    a description of each that does not. Never raises."""
    properties: dict[str, Any] = {}
    problems: list[str] = []
    try:
        flags, = unpack_from(">H", buf, offset)
        offset += 2
        for bit, (name, kind) in zip(range(15, 1, -1), amqp.Message.PROPERTIES):
            if not flags & (1 << bit):
                continue
            if kind == "s":
                size = buf[offset]
                raw = bytes(buf[offset + 1:offset + 1 + size])
                offset += 1 + size
                if len(raw) < size:
                    raise struct.error
                try:
                    properties[name] = raw.decode("utf-8", "surrogatepass")  # as py-amqp decodes
                except UnicodeDecodeError:
                    problems.append(f"{name} is not UTF-8 ({_quote(raw)})")
            elif kind == "F":
                size, = unpack_from(">I", buf, offset)
                end = offset + 4 + size
                if end > len(buf):
                    raise struct.error
                try:
                    properties[name] = loads("F", buf[:end], offset)[0][0]
                except Exception as exc:  # noqa: BLE001 - RecursionError, OverflowError, struct.error, ...
                    problems.append(f"{name} table does not decode ({type(exc).__name__}: {str(exc)[:200]})")
                offset = end
            else:
                properties[name], = unpack_from(_FIXED[kind], buf, offset)
                offset += struct.calcsize(_FIXED[kind])
    except (struct.error, IndexError):
        problems.append("the property list ends early")
    return properties, problems


def _undecodable_header(message: amqp.Message, buf: bytes, exc: BaseException) -> UndecodableMessage:
    if len(buf) < 12:
        raise UnexpectedFrame(f"content header of {len(buf)} bytes") from exc
    _, body_size = unpack_from(">HxxQ", buf, 0)
    properties, problems = lenient_properties(buf, 12)
    bad = UndecodableMessage(frame_method=message.frame_method, frame_args=message.frame_args)
    bad.properties = properties
    bad.problem = "; ".join(problems) or f"{type(exc).__name__}: {str(exc)[:200]}"
    bad.raw_properties = bytes(buf[12:])
    bad.body_size = body_size
    bad.ready = not body_size
    return bad


def _mark(message: amqp.Message, problem: str) -> UndecodableMessage:
    if isinstance(message, UndecodableMessage):
        message.problem = f"{message.problem}; {problem}"
        return message
    bad = UndecodableMessage(frame_method=message.frame_method, frame_args=message.frame_args)
    bad.properties, bad.body, bad.ready = message.properties, message.body, True
    bad.problem, bad.raw_properties = problem, b""
    return bad


def _args_decode(method_sig: tuple[Any, ...], args: bytes) -> bool:
    try:
        loads("".join(kind for _, kind in _CONTENT_ARGS[method_sig]), args, 4)
    except Exception:  # noqa: BLE001 - whatever py-amqp raises on them
        return False
    return True


def _lenient_args(fields: tuple[Any, ...], args: bytes) -> tuple[list[Any], list[str]]:
    """The method's arguments with every string that is not UTF-8 backslash-escaped.
    (Each content method has at most one bit argument, so bits need no packing here.)"""
    values: list[Any] = []
    problems: list[str] = []
    offset = 4
    for name, kind in fields:
        if kind == "s":
            size = args[offset]
            raw = args[offset + 1:offset + 1 + size]
            offset += 1 + size
            try:
                values.append(raw.decode("utf-8", "surrogatepass"))
            except UnicodeDecodeError:
                values.append(raw.decode("utf-8", "backslashreplace"))
                problems.append(f"{name} is not UTF-8 ({_quote(raw)})")
        elif kind == "b":
            values.append(bool(args[offset] & 1))
            offset += 1
        else:
            values.append(unpack_from(_FIXED[kind], args, offset)[0])
            offset += struct.calcsize(_FIXED[kind])
    return values, problems


def _quote(raw: bytes) -> str:
    return repr(raw[:_SHOWN]) + ("..." if len(raw) > _SHOWN else "")
