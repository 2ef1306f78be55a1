"""FrameReader.read_frame: a frame wholly in the buffer is read in one go; anything else
(a frame still arriving, a bad frame-end octet, one over frame_max) reads and fails exactly
as py-amqp's own ``read_frame`` does."""
from __future__ import annotations

import socket
import struct

import pytest
from amqp.exceptions import UnexpectedFrame
from amqp.transport import TCPTransport

from amqprpc.transport.framereader import FrameReader, LinkClosed


def frame(frame_type: int, channel: int, payload: bytes, end: int = 0xCE) -> bytes:
    return struct.pack(">BHI", frame_type, channel, len(payload)) + payload + bytes([end])


def reader_over(sock: socket.socket, waits: list[int] | None = None, on_wait=None) -> FrameReader:
    transport = TCPTransport.__new__(TCPTransport)  # py-amqp's read_frame over our reader, no connect
    transport.sock, transport._read_buffer = sock, b""

    def wait() -> None:
        if waits is not None:
            waits.append(1)
        if on_wait is not None:
            on_wait()

    reader = FrameReader(transport, wait=wait, max_frame=4096)
    assert transport.read_frame == reader.read_frame
    return reader


def test_whole_frames_in_the_buffer_come_out_one_by_one_in_order():
    ours, theirs = socket.socketpair()
    reader = reader_over(ours)
    theirs.sendall(frame(1, 1, b"ack") + frame(2, 3, b"header") + frame(3, 3, b"body"))
    assert reader.read_frame() == (1, 1, b"ack")
    assert reader.buffered
    assert reader.read_frame() == (2, 3, b"header")
    assert reader.read_frame() == (3, 3, b"body")
    assert not reader.buffered


def test_a_frame_still_arriving_is_completed_through_the_wait():
    ours, theirs = socket.socketpair()
    whole = frame(3, 1, b"x" * 100)
    waits: list[int] = []
    reader = reader_over(ours, waits, on_wait=lambda: theirs.sendall(whole[50:]))
    theirs.sendall(whole[:50])
    assert reader.read_frame() == (3, 1, b"x" * 100) and waits == [1]


def test_a_bad_frame_end_or_an_oversized_frame_fails_as_before():
    ours, theirs = socket.socketpair()
    reader = reader_over(ours)
    theirs.sendall(frame(1, 1, b"ack", end=0x00))
    with pytest.raises(UnexpectedFrame):
        reader.read_frame()
    ours, theirs = socket.socketpair()
    reader = reader_over(ours)
    theirs.sendall(frame(3, 1, b"y" * 5000)[:7])  # announced, not here: refused before reading it
    with pytest.raises(LinkClosed, match="not AMQP"):
        reader.read_frame()


def test_the_end_of_the_stream_is_link_closed_and_nothing_there_waits():
    ours, theirs = socket.socketpair()
    waits: list[int] = []
    reader = reader_over(ours, waits, on_wait=lambda: theirs.sendall(frame(8, 0, b"")))
    assert reader.read_frame() == (8, 0, b"") and waits == [1]  # a heartbeat, after a wait
    theirs.close()
    with pytest.raises(LinkClosed):
        reader.read_frame()


def test_frame_now_never_waits_a_part_stays_buffered_for_the_next_reader():
    ours, theirs = socket.socketpair()
    waits: list[int] = []
    reader = reader_over(ours, waits)
    whole = frame(3, 1, b"x" * 100)
    assert reader.frame_now(True) is None  # nothing there
    theirs.sendall(frame(1, 1, b"ack") + whole[:50])
    assert reader.frame_now(True) == (1, 1, b"ack")
    assert reader.frame_now(True) is None and reader.buffered  # half a frame: kept, not waited for
    theirs.sendall(whole[50:])
    assert reader.frame_now(False) is None  # without fetch: only what is buffered
    assert reader.frame_now(True) == (3, 1, b"x" * 100) and not reader.buffered
    assert waits == []


def test_frame_now_refuses_an_oversized_frame_or_a_bad_frame_end_at_once():
    ours, theirs = socket.socketpair()
    reader = reader_over(ours)
    theirs.sendall(struct.pack(">BHI", 3, 1, 1 << 20))
    with pytest.raises(LinkClosed):
        reader.frame_now(True)
    ours, theirs = socket.socketpair()
    reader = reader_over(ours)
    theirs.sendall(frame(1, 1, b"ack", end=0x00))
    with pytest.raises(UnexpectedFrame):
        reader.frame_now(True)
