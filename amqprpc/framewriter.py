"""Socket writes that never block, for a py-amqp connection written from many threads.

py-amqp writes frames with ``sock.sendall``: when the broker stops reading (a stalled
link, a stuck proxy, a peer gone without a FIN), the kernel's send buffer fills and the
writer blocks, for as long as TCP keeps the connection, while holding the connection's
write lock. Every other writer, a caller publishing a call, a handler thread replying,
the loop thread sending a heartbeat, then queues behind it: calls outlive their timeouts.

:class:`FrameWriter` replaces the transport's ``_write``. It sends with ``MSG_DONTWAIT``;
what the kernel does not take at once is copied into a backlog, and the loop thread sends
the backlog when ``poll()`` says the socket is writable again (:meth:`flush`). Frames stay
in order: once there is a backlog, later frames join it. Nobody ever waits in a write; a
link that stopped moving is found dead by its silence (:class:`amqprpc.link.Link`) and
dropped with its backlog.

Every write happens under the loop's ``write_lock`` (``AmqpLoop._lock_frames``), and so
does :meth:`flush`. Only plain TCP transports are wrapped (TLS keeps ``sendall``).
"""
from __future__ import annotations

import collections
import socket
from typing import Callable

from amqp.transport import TCPTransport


class FrameWriter:
    def __init__(self, transport: TCPTransport, wake: Callable[[], None]):
        self._send = transport.sock.send
        self._backlog: collections.deque[memoryview] = collections.deque()
        self._wake = wake
        transport._write = self.write

    @property
    def backlog(self) -> bool:
        """True while written frames wait for the socket to take them."""
        return bool(self._backlog)

    def write(self, data: bytes | memoryview) -> None:
        """All of ``data``, at once or later; never blocks (py-amqp's ``_write``)."""
        if self._backlog:
            self._backlog.append(memoryview(bytes(data)))
            return
        try:
            sent = self._send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return
        # A copy: py-amqp packs every frame into one buffer it reuses for the next.
        self._backlog.append(memoryview(bytes(data[sent:])))
        self._wake()  # the loop polls for POLLOUT only while there is a backlog

    def flush(self) -> None:
        """Send as much of the backlog as the socket takes now (loop thread, writable)."""
        backlog = self._backlog
        while backlog:
            chunk = backlog[0]
            try:
                sent = self._send(chunk, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            if sent < len(chunk):
                backlog[0] = chunk[sent:]
                return
            backlog.popleft()
