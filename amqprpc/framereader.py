"""Buffered, non-blocking frame reads for the loop thread of a py-amqp connection.

py-amqp's ``drain_events(timeout=0)`` costs, for every frame set it reads, two
``settimeout()`` syscalls (to non-blocking and back) and two ``recv()`` per frame (a
7-byte header, then the payload): a reply or a delivery is three frames, so about nine
syscalls, plus a ``socket.timeout`` raised through a context manager to learn that
nothing more is waiting. :class:`FrameReader` replaces the transport's ``_read``: it
reads whatever the kernel holds (up to 64 KiB) in one ``recv`` into its own buffer and
serves frames from there. At a frame boundary with an empty buffer, in non-blocking
mode, it asks the kernel with ``MSG_DONTWAIT`` instead of switching the socket's mode,
and raises ``socket.timeout`` as py-amqp's own timeout would; the loop then goes back to
``poll()``. Mid-frame it blocks: the rest of the frame is already on its way.

Outside :meth:`nonblocking` (a channel method waiting for its reply on the loop thread,
e.g. ``basic_cancel``) reads block as py-amqp's do; frames such a wait read past its
reply stay in the buffer, which the loop checks (:attr:`buffered`) before it polls. Only plain TCP transports are
wrapped; TLS keeps py-amqp's reader, whose SSL object does its own buffering.
"""
from __future__ import annotations

import contextlib
import socket
from typing import Iterator

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
    def install(cls, amqp_connection) -> "FrameReader | None":
        transport = amqp_connection.transport
        if type(transport) is not TCPTransport:
            return None
        return cls(transport)

    @property
    def buffered(self) -> bool:
        """True when frames already read wait in the buffer (poll() cannot see them)."""
        return len(self._buf) > self._pos

    @contextlib.contextmanager
    def nonblocking(self) -> Iterator[None]:
        """Within: a read at a frame boundary with nothing received raises socket.timeout."""
        self._nonblocking = True
        try:
            yield
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
