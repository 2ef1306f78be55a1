"""Buffered, non-blocking frame reads for the loop thread of a py-amqp connection.

py-amqp's ``drain_events(timeout=0)`` costs, for every frame set it reads, two
``settimeout()`` syscalls (to non-blocking and back) and two ``recv()`` per frame (a
7-byte header, then the payload): a reply or a delivery is three frames, so about nine
syscalls, plus a ``socket.timeout`` raised through a context manager to learn that
nothing more is waiting. :class:`FrameReader` replaces the transport's ``_read``: it
reads whatever the kernel holds (up to 64 KiB) in one ``recv`` into its own buffer and
serves frames from there, always with ``MSG_DONTWAIT`` (the socket's own mode stays
blocking, for py-amqp). In :meth:`FrameReader.drain`, at a frame boundary with nothing
buffered, it stops (:class:`Idle`) -- only there, never inside a frame's dispatch
(:meth:`FrameReader.watch_dispatch`).

Every other read that finds nothing there (the rest of a frame, or a channel method
waiting for its reply on the loop thread, e.g. ``queue_declare``) calls the ``wait``
it was given, which returns once the socket is readable and raises when the broker
stays silent too long (:class:`amqprpc.transport.link.Link.wait_readable`): no read waits without
a bound. Frames such a wait read past its reply stay in the buffer, which the loop
checks (:attr:`buffered`) before it polls.

Errors keep their meaning: an orderly end of the stream is :class:`LinkClosed`; a reset,
a refused or a timed-out connection (``ETIMEDOUT``, which is a ``socket.timeout`` since
Python 3.10) propagates as the ``OSError`` it is, never mistaken for "nothing to read".

A blocking caller that reads its own reply (:mod:`amqprpc.transport.readtoken`) takes only
frames that have wholly arrived (:meth:`FrameReader.frame_now`), so it never waits inside a
frame; a part it leaves stays in the buffer for the next reader.

Only plain TCP transports are wrapped; TLS keeps py-amqp's reader, whose SSL object does
its own buffering.
"""
from __future__ import annotations

import socket
import struct
from typing import Any, Callable

from amqp.transport import TCPTransport

_CHUNK = 65536
_HEADER = struct.Struct(">BHI")  # frame type, channel, payload size
_FRAME_END = 0xCE


class Idle(Exception):
    """Nothing more to read now (only raised inside :meth:`FrameReader.drain`)."""


class LinkClosed(ConnectionError):
    """The broker (or something between) ended the TCP stream."""


class FrameReader:
    def __init__(self, transport: TCPTransport, wait: Callable[[], None], max_frame: int):
        self._recv = transport.sock.recv
        self._buf = bytearray(transport._read_buffer)  # whatever py-amqp had already read
        transport._read_buffer = b""
        self._pos = 0
        self._draining = False
        self._wait = wait
        self._dispatching = 0  # frames being dispatched (nested when a dispatch waits for the broker)
        self._max = max_frame + 8  # a frame's payload and end octet: anything larger is not AMQP
        transport._read = self.read
        # py-amqp's, for partial frames and every error (a stand-in transport may have none)
        self._read_frame: Callable[[], tuple[int, int, bytes]] | None = getattr(transport, "read_frame", None)
        if self._read_frame is not None:
            transport.read_frame = self.read_frame

    def read_frame(self) -> tuple[int, int, bytes]:
        """py-amqp's ``transport.read_frame()``, for a frame wholly in the buffer (the usual
        case: one ``recv`` brings whole frames) in one unpack and one copy instead of three
        ``read`` calls; with too little buffered it first takes what the kernel holds, without
        waiting. Anything else (a frame still arriving, one larger than frame_max, a bad
        frame-end octet, nothing there) goes through py-amqp's own, which reads, waits and
        refuses as before."""
        frame = self._whole_frame()
        if frame is None and self._take_what_arrived():
            frame = self._whole_frame()
        if frame is not None:
            return frame
        assert self._read_frame is not None  # installed only over a transport that has one
        return self._read_frame()

    def _whole_frame(self) -> tuple[int, int, bytes] | None:
        buf, pos = self._buf, self._pos
        if len(buf) - pos < 7:
            return None
        frame_type, channel, size = _HEADER.unpack_from(buf, pos)
        end = pos + 7 + size
        if end >= len(buf) or size + 8 > self._max or buf[end] != _FRAME_END:
            return None
        payload = bytes(buf[pos + 7:end])
        if end + 1 == len(buf):
            buf.clear()
            self._pos = 0
        else:
            self._pos = end + 1
        return frame_type, channel, payload

    def frame_now(self, fetch: bool) -> tuple[int, int, bytes] | None:
        """The next frame if it has wholly arrived, never waiting: from the buffer, else (with
        ``fetch``) after taking what the kernel holds; None when it is not all here yet (a part
        stays buffered for the next reader). For a caller leading the reads
        (:mod:`amqprpc.transport.readtoken`), which must never wait inside a frame. A frame
        larger than frame_max is :class:`LinkClosed`, a bad frame-end octet py-amqp's error,
        as in :meth:`read_frame`."""
        while True:
            frame = self._whole_frame()
            if frame is not None:
                return frame
            buf, pos = self._buf, self._pos
            if len(buf) - pos >= 7:
                size = _HEADER.unpack_from(buf, pos)[2]
                if size + 8 > self._max:
                    raise LinkClosed(f"a frame of {size} bytes announced; frame_max is {self._max - 8}: not AMQP")
                if len(buf) - pos >= size + 8:  # all here, but its end octet is wrong: py-amqp says so
                    return self.read_frame()
            if not fetch or not self._take_what_arrived():
                return None

    def _take_what_arrived(self) -> bool:
        """One ``recv`` that does not wait, appended to the buffer: whether it brought bytes.
        The end of the stream is :class:`LinkClosed`, as in :meth:`read`."""
        try:
            chunk = self._recv(_CHUNK, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        if not chunk:
            raise LinkClosed("the broker closed the TCP connection")
        if self._pos:
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += chunk
        return True

    @staticmethod
    def events_of(connection: Any) -> Callable[[], None]:
        """``connection.drain_events()`` (no timeout) without py-amqp's ``having_timeout``
        context manager around every frame: reads here never use the socket's timeout."""
        transport = connection.transport

        def drain_events() -> None:
            while not connection.on_inbound_frame(transport.read_frame()):
                pass

        return drain_events

    def watch_dispatch(self, connection: Any) -> None:
        """Count the frames of ``connection`` being dispatched (wraps its
        ``on_inbound_frame``): :class:`Idle` is raised only between frames, never inside a
        frame's dispatch. A dispatch may itself wait for the broker (a channel method's
        reply; py-amqp reopening a channel the broker closed): an Idle raised there would
        unwind through the dispatch and take the broker's error with it."""
        dispatch = connection.on_inbound_frame

        def on_inbound_frame(frame: Any) -> Any:
            self._dispatching += 1
            try:
                return dispatch(frame)
            finally:
                self._dispatching -= 1

        connection.on_inbound_frame = on_inbound_frame

    @property
    def buffered(self) -> bool:
        """True when frames already read wait in the buffer (poll() cannot see them)."""
        return len(self._buf) > self._pos

    def drain(self, drain_events: Callable[[], None]) -> None:
        """Dispatch every frame already received, then return (to the loop's ``poll()``).

        One ``recv`` fills the buffer; frames are dispatched from it until it is empty.
        Stopping there, rather than reading until EAGAIN, saves a syscall and an exception
        raised through four frames per wake-up: ``poll()`` reports whatever arrived meanwhile.
        """
        self._draining = True
        try:
            drain_events()
            while len(self._buf) > self._pos:
                drain_events()
        except Idle:
            pass  # poll() said readable, but nothing was there after all
        finally:
            self._draining = False

    def read(self, n: int, initial: bool = False) -> bytes:
        """Exactly ``n`` bytes (the signature of py-amqp's ``_AbstractTransport._read``)."""
        buf, pos = self._buf, self._pos
        if len(buf) - pos < n:
            if n > self._max:
                raise LinkClosed(f"a frame of {n} bytes announced; frame_max is {self._max - 8}: not AMQP")
            if pos:
                del buf[:pos]
                pos = self._pos = 0
            while len(buf) < n:
                try:
                    chunk = self._recv(max(_CHUNK, n - len(buf)), socket.MSG_DONTWAIT)
                except BlockingIOError:
                    if initial and not buf and self._draining and not self._dispatching:
                        raise Idle() from None
                    self._wait()
                    continue
                if not chunk:
                    raise LinkClosed("the broker closed the TCP connection")
                buf += chunk
        end = pos + n
        data = bytes(buf[pos:end])
        if end == len(buf):
            buf.clear()
            self._pos = 0
        else:
            self._pos = end
        return data


class TimeoutReads:
    """py-amqp's own reads, for transports FrameReader does not wrap (TLS)."""

    buffered = False

    @staticmethod
    def events_of(connection: Any) -> Callable[..., None]:
        return connection.drain_events  # type: ignore[no-any-return]

    def drain(self, drain_events: Callable[..., None]) -> None:
        try:
            while True:
                drain_events(timeout=0)
        except socket.timeout as exc:
            if getattr(exc, "errno", None):  # ETIMEDOUT: the connection, not "nothing to read"
                raise
