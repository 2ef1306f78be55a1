"""Hand-built AMQP frames: publishing what py-amqp would refuse to encode, or would encode
otherwise (short strings that are not UTF-8, header tables with any type letter and value).

RabbitMQ still checks some of it on publish (delivery_mode, expiration, user_id, table
type letters it does not know) and closes the publishing connection for those; everything
else it routes to consumers as received.
"""
from __future__ import annotations

import struct
from typing import Any

import amqp
from amqp.serialization import dumps


def encode_properties(fields: dict[str, Any]) -> bytes:
    """Property flags and list. Short strings as bytes (sent as they are) or str; the
    headers table as raw bytes (length included, see :func:`table`) or a dict for py-amqp
    to encode; octets and the timestamp as ints."""
    flags, out = 0, b""
    for index, (name, kind) in enumerate(amqp.Message.PROPERTIES):
        if name not in fields:
            continue
        flags |= 1 << (15 - index)
        value = fields[name]
        if kind == "s":
            out += shortstr(value)
        elif kind == "F":
            out += value if isinstance(value, bytes) else dumps("F", [value])
        elif kind == "o":
            out += struct.pack(">B", value)
        else:
            out += struct.pack(">Q", value)
    return struct.pack(">H", flags) + out


def shortstr(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return bytes([len(raw)]) + raw


def table(*entries: bytes) -> bytes:
    """A field table from :func:`entry` values, with its length."""
    data = b"".join(entries)
    return struct.pack(">I", len(data)) + data


def array(*items: tuple[str, bytes]) -> bytes:
    """A field array of (type letter, value bytes) items, with its length."""
    data = b"".join(kind.encode() + payload for kind, payload in items)
    return struct.pack(">I", len(data)) + data


def entry(key: str | bytes, kind: str, payload: bytes) -> bytes:
    """One table field: key, type letter, the value's bytes as that type reads them."""
    return shortstr(key) + kind.encode() + payload


def nested_tables(depth: int) -> bytes:
    """A headers table holding a table holding a table ... ``depth`` deep."""
    inner = b""
    for _ in range(depth):
        inner = entry("k", "F", struct.pack(">I", len(inner)) + inner)
    return table(inner)


def publish(connection: amqp.Connection, channel: amqp.Channel, exchange: str, routing_key: str | bytes,
            properties: bytes, body: bytes) -> None:
    """basic.publish with exactly these property bytes and body, on ``channel``."""
    args = struct.pack(">HHH", 60, 40, 0) + shortstr(exchange) + shortstr(routing_key) + b"\x00"
    frames = [(1, args), (2, struct.pack(">HHQ", 60, 0, len(body)) + properties)]
    chunk = connection.frame_max - 8
    frames += [(3, body[start:start + chunk]) for start in range(0, len(body), chunk)]
    connection.transport.write(b"".join(struct.pack(">BHI", kind, channel.channel_id, len(payload)) + payload + b"\xce"
                                        for kind, payload in frames))
