"""The pieces under a stalled link, without a broker: frames in and out, errors in words,
the deadline timer, frames for channels the connection does not have."""
from __future__ import annotations

import errno
import socket
import struct
import threading
import time

import pytest
from amqp import spec
from amqp.exceptions import ConnectionForced

from amqprpc.transport.deadlines import Timer
from amqprpc.transport.framehandler import frame_handler
from amqprpc.transport.framereader import FrameReader, LinkClosed
from amqprpc.transport.framewriter import FrameWriter
from amqprpc.transport.link import LinkDead, describe


class Transport:
    """What FrameReader and FrameWriter take from py-amqp's TCPTransport."""

    def __init__(self, sock):
        self.sock = sock
        self._read_buffer = b""


def test_errors_say_what_happened():
    assert describe(TimeoutError(errno.ETIMEDOUT, "Connection timed out")) == \
        "timed out: the network stopped delivering (ETIMEDOUT)"
    assert describe(socket.timeout("timed out")) == "timed out: no answer in time"
    assert describe(ConnectionResetError(errno.ECONNRESET, "reset")) == "connection reset by the peer (ECONNRESET)"
    assert describe(ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")).startswith("connection refused")
    assert describe(ConnectionForced("CONNECTION_FORCED - shutdown", (0, 0), reply_code=320)) == \
        "closed by the broker: 320 CONNECTION_FORCED - shutdown"
    assert describe(LinkClosed("the broker closed the TCP connection")) == "the broker closed the TCP connection"
    assert describe(LinkDead("nothing from the broker for 4.0s")) == "nothing from the broker for 4.0s"


def test_a_timed_out_or_reset_read_is_an_error_never_nothing_to_read():
    class Failing:
        def __init__(self, exc):
            self.exc = exc

        def recv(self, size, flags=0):
            raise self.exc

    for exc in (TimeoutError(errno.ETIMEDOUT, "Connection timed out"), ConnectionResetError(errno.ECONNRESET, "x")):
        reader = FrameReader(Transport(Failing(exc)), wait=lambda: None, max_frame=131072)
        with pytest.raises(type(exc)):
            reader.drain(lambda: reader.read(7, initial=True))


def test_frames_arrive_whole_through_waits_and_the_end_of_the_stream_is_link_closed():
    ours, theirs = socket.socketpair()
    waits = []

    def wait():  # as Link.wait_readable: until readable
        waits.append(1)
        theirs.sendall(b"world")

    reader = FrameReader(Transport(ours), wait=wait, max_frame=131072)
    theirs.sendall(b"hello ")
    assert reader.read(11) == b"hello world" and waits == [1]
    theirs.close()
    with pytest.raises(LinkClosed):
        reader.read(1)
    with pytest.raises(LinkClosed, match="not AMQP"):
        reader.read(1 << 30)


def test_a_frames_dispatch_that_waits_for_the_broker_is_never_cut_short_by_idle():
    """drain() stops with Idle at a frame boundary with nothing read; a dispatch that waits
    for the broker (py-amqp reopening a channel the broker closed, waiting for Open-Ok)
    must wait instead: an Idle raised there unwound through the dispatch and took the
    broker's error (406 consumer timeout) with it, silently."""
    ours, theirs = socket.socketpair()

    class Connection:
        def __init__(self, reader):
            self.reader = reader

        def on_inbound_frame(self, frame):  # a Channel.Close: answered, then waits for Open-Ok
            assert self.reader.read(7, initial=True) == b"open-ok"
            raise ConnectionForced("PRECONDITION_FAILED - delivery acknowledgement timed out", (0, 0),
                                   reply_code=406)

    waits = []

    def wait():  # as Link.wait_readable: until readable
        waits.append(1)
        theirs.sendall(b"open-ok")

    reader = FrameReader(Transport(ours), wait=wait, max_frame=131072)
    connection = Connection(reader)
    reader.watch_dispatch(connection)
    theirs.sendall(b"close!!")
    with pytest.raises(ConnectionForced, match="timed out"):
        reader.drain(lambda: connection.on_inbound_frame(reader.read(7, initial=True)))
    assert waits == [1]
    reader.drain(lambda: connection.on_inbound_frame(reader.read(7, initial=True)))  # nothing there: Idle, quietly


def test_writes_never_block_and_keep_their_order():
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    woken = []
    writer = FrameWriter(Transport(ours), wake=lambda: woken.append(1))
    chunks = [bytes([n]) * 65536 for n in range(64)]  # 4 MB nobody reads yet
    started = time.monotonic()
    for chunk in chunks:
        writer.write(memoryview(chunk))
    assert time.monotonic() - started < 1.0 and writer.backlog and woken
    received = bytearray()
    theirs.setblocking(False)
    while writer.backlog or len(received) < len(chunks) * 65536:
        writer.flush()
        try:
            received += theirs.recv(1 << 20)
        except BlockingIOError:
            pass
    assert bytes(received) == b"".join(chunks)


class CountingSocket:
    """A socket whose sends are counted (and whose send buffer takes ``room`` bytes at most)."""

    def __init__(self, room: int = 1 << 30):
        self.sent, self.calls, self.room = bytearray(), 0, room

    def send(self, data, flags=0):
        return self.sendmsg([data], (), flags)

    def sendmsg(self, buffers, ancillary=(), flags=0):
        self.calls += 1
        data = b"".join(bytes(b) for b in buffers)[:self.room]
        if not data:
            raise BlockingIOError()
        self.sent += data
        self.room -= len(data)
        return len(data)


def test_corked_frames_leave_in_one_send_in_order():
    sock = CountingSocket()
    writer = FrameWriter(Transport(sock), wake=lambda: None)
    reused = bytearray(b"reply")  # py-amqp packs every frame into one buffer it reuses
    writer.cork()
    writer.write(memoryview(reused))
    reused[:] = b"ack.."
    writer.write(memoryview(reused))
    assert sock.calls == 0
    writer.uncork()
    writer.write(b"next")
    assert bytes(sock.sent) == b"replyack..next" and sock.calls == 2
    writer.cork()  # a large frame is not copied and joined: it goes at once, after what was collected
    writer.write(b"small")
    writer.write(b"L" * 20000)
    writer.write(b"tail")
    writer.uncork()
    assert bytes(sock.sent) == b"replyack..next" + b"small" + b"L" * 20000 + b"tail" and sock.calls == 5


def test_the_backlog_leaves_many_chunks_per_send():
    sock = CountingSocket(room=10)
    writer = FrameWriter(Transport(sock), wake=lambda: None)
    for n in range(100):
        writer.write(b"%03d" % n)  # the first 10 bytes go at once, the rest waits
    assert writer.backlog and sock.calls == 4  # 3 whole, 1 partly; the rest joined the backlog unsent
    sock.room = 1 << 30
    writer.flush()
    assert not writer.backlog and sock.calls == 4 + 2  # 97 chunks: 64 per sendmsg
    assert bytes(sock.sent) == b"".join(b"%03d" % n for n in range(100))


def test_the_timer_fires_at_the_earliest_time_asked_from_any_thread():
    fired = []
    timer = Timer(lambda now: fired.append(now) or None, name="test-timer")
    start = time.monotonic()
    timer.arm(start + 0.3)
    threading.Thread(target=timer.arm, args=(start + 0.1,)).start()
    deadline = time.monotonic() + 5
    while not fired and time.monotonic() < deadline:
        time.sleep(0.01)
    timer.close()
    assert fired and 0.1 <= fired[0] - start < 0.3


def test_frames_for_a_channel_the_connection_does_not_have_are_dropped():
    calls = []

    class Connection:
        bytes_recv = 0
        channels = {0: "the connection", 1: "channel 1"}

        def on_inbound_method(self, channel, method_sig, args, content):
            self.channels[channel]  # noqa: B018 - as py-amqp's: KeyError for a channel it does not have
            calls.append(channel)

    connection = Connection()
    cancel_ok = struct.pack(">HH", *spec.Basic.CancelOk) + b"\x04ctag"
    on_frame = frame_handler(connection, connection.on_inbound_method)
    assert on_frame((1, 9, cancel_ok)) is True and calls == []  # dropped with a warning
    assert on_frame((1, 1, cancel_ok)) is True and calls == [1]

    def broken(channel, method_sig, args, content):
        raise KeyError("a bug elsewhere")

    with pytest.raises(KeyError):  # a known channel's KeyError is not swallowed
        frame_handler(connection, broken)((1, 1, cancel_ok))


def test_a_wait_for_the_broker_ends_when_the_link_stays_silent_and_keeps_heartbeats_going():
    from types import SimpleNamespace

    from amqp.transport import TCPTransport

    from amqprpc.transport.link import Link

    ours, theirs = socket.socketpair()
    transport = TCPTransport("127.0.0.1:1")  # not connected: it only lends its socket
    transport.sock, transport._read_buffer = ours, b""
    heartbeats = []
    connection = SimpleNamespace(heartbeat=0.5, bytes_sent=0, frame_max=131072, transport=transport,
                                 on_inbound_frame=lambda frame: None,
                                 send_heartbeat=lambda: heartbeats.append(time.monotonic()))
    link = Link(connection, threading.RLock(), wake=lambda: None)
    started = time.monotonic()
    with pytest.raises(LinkDead, match="heartbeat 0.5s"):
        link.reader.read(7)  # e.g. a channel method waiting for its reply
    assert 0.9 <= time.monotonic() - started < 2.0  # two heartbeat intervals of silence
    assert len(heartbeats) >= 2  # ours kept going meanwhile
    theirs.close()
