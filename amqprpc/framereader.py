"""Buffered, non-blocking frame reads for the loop thread of a py-amqp connection.

py-amqp's ``drain_events(timeout=0)`` costs, for every frame set it reads, two
``settimeout()`` syscalls (to non-blocking and back) and two ``recv()`` per frame (a
7-byte header, then the payload): a reply or a delivery is three frames, so about nine
syscalls, plus a ``socket.timeout`` raised through a context manager to learn that
nothing more is waiting. :class:`FrameReader` replaces the transport's ``_read``: it
reads whatever the kernel holds (up to 64 KiB) in one ``recv`` into its own buffer and
serves frames from there. At a frame boundary with an empty buffer, in non-blocking
mode, it asks the kernel with ``MSG_DONTWAIT`` instead of switching the socket's mode,
and raises ``socket.timeout`` as py-amqp's own timeout would. Mid-frame it blocks: the rest of the frame is already on its way.

Outside :meth:`drain` (a channel method waiting for its reply on the loop thread,
e.g. ``basic_cancel``) reads block as py-amqp's do; frames such a wait read past its
reply stay in the buffer, which the loop checks (:attr:`buffered`) before it polls. Only plain TCP transports are
wrapped; TLS keeps py-amqp's reader, whose SSL object does its own buffering.
"""
from __future__ import annotations

import socket
from typing import Callable

from amqp.transport import TCPTransport

_CHUNK = 65536


class FrameReader:
    def __init__(self, transport: TCPTransport):
        self._recv = transport.sock.recv
        self._buf = bytearray(transport._read_buffer)  # whatever py-amqp had already read
        transport._read_buffer = b""
        self._pos = 0
        self._nonblocking = False
        transport._read = self.read

    @classmethod
    def install(cls, amqp_connection) -> "FrameReader | TimeoutReads":
        transport = amqp_connection.transport
        if type(transport) is not TCPTransport:
            return TimeoutReads()
        return cls(transport)

    @property
    def buffered(self) -> bool:
        """True when frames already read wait in the buffer (poll() cannot see them)."""
        return len(self._buf) > self._pos

    def drain(self, drain_events: Callable[[], None]) -> None:
        """Dispatch every frame already received, then return (to the loop's ``poll()``).

        One ``recv`` fills the buffer; frames are dispatched from it until it is empty.
        Stopping there, rather than reading until EAGAIN, saves a syscall and a
        ``socket.timeout`` raised through four frames per wake-up: ``poll()`` reports
        whatever arrived meanwhile.
        """
        self._nonblocking = True
        try:
            drain_events()
            while len(self._buf) > self._pos:
                drain_events()
        except socket.timeout:
            pass  # poll() said readable, but nothing was there after all
        finally:
            self._nonblocking = False

    def read(self, n: int, initial: bool = False) -> bytes:
        """Exactly ``n`` bytes (the signature of py-amqp's ``_AbstractTransport._read``)."""
        buf, pos = self._buf, self._pos
        if len(buf) - pos < n:
            if pos:
                del buf[:pos]
                pos = self._pos = 0
            while len(buf) < n:
                if initial and not buf and self._nonblocking:
                    try:
                        chunk = self._recv(_CHUNK, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        raise socket.timeout() from None
                else:
                    chunk = self._recv(max(_CHUNK, n - len(buf)))
                if not chunk:
                    raise OSError("Server unexpectedly closed connection")
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

    def drain(self, drain_events: Callable[..., None]) -> None:
        try:
            while True:
                drain_events(timeout=0)
        except socket.timeout:
            pass
