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
link that stopped moving is found dead by its silence (:class:`amqprpc.transport.link.Link`) and
dropped with its backlog.

Several frames, one write: while the writer is *corked* (:meth:`cork`), frames are only
collected, and :meth:`uncork` sends them all with one ``send``. A handler thread corks
around its reply and its ack (``AmqpLoop.cork``). Cork and uncork happen within one hold
of the write lock, so collected frames keep their order with every other thread's (the
order publisher confirms are numbered by), and nothing is corked while anyone waits for
the broker. The backlog, too, goes out many chunks per syscall (``sendmsg``).

Every write happens under the loop's ``write_lock`` (``AmqpLoop._lock_frames``), and so
do :meth:`flush` and :meth:`uncork`. Only plain TCP transports are wrapped (TLS keeps
``sendall``).
"""
from __future__ import annotations

import collections
import socket
from itertools import islice
from typing import Callable

from amqp.transport import TCPTransport


# Buffers per sendmsg() of the backlog (Linux takes up to 1024).
_GATHER = 64
# Corking pays for small frames (a syscall saved per frame); a larger one is sent at once,
# after what was collected, rather than copied and joined (a 1 MB reply's body frames).
_CORK_MAX = 16384


class FrameWriter:
    def __init__(self, transport: TCPTransport, wake: Callable[[], None]):
        self._send = transport.sock.send
        self._sendmsg = transport.sock.sendmsg
        self._backlog: collections.deque[memoryview] = collections.deque()
        self._wake = wake
        self.corked = False
        self._collected: list[bytes] = []
        transport._write = self.write

    def cork(self) -> None:
        """Collect frames from now on instead of sending them (see the module's doc)."""
        self.corked = True

    def uncork(self) -> None:
        """Send what was collected, in one write (under ``write_lock``)."""
        self.corked = False
        self._send_collected()

    def _send_collected(self) -> None:
        collected = self._collected
        if collected:
            self._collected = []
            self._write(collected[0] if len(collected) == 1 else b"".join(collected))

    @property
    def backlog(self) -> bool:
        """True while written frames wait for the socket to take them."""
        return bool(self._backlog)

    def write(self, data: bytes | memoryview) -> None:
        """All of ``data``, at once or later; never blocks (py-amqp's ``_write``)."""
        if self.corked:
            if len(data) <= _CORK_MAX:
                # A copy: py-amqp packs every frame into one buffer it reuses for the next.
                self._collected.append(bytes(data))
                return
            self._send_collected()  # in order: what was collected goes first
        self._write(data)

    def _write(self, data: bytes | memoryview) -> None:
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
        """Send as much of the backlog as the socket takes now (loop thread, writable):
        many chunks per syscall (``sendmsg`` gathers them without copying)."""
        backlog = self._backlog
        while backlog:
            try:
                sent = self._sendmsg(list(islice(backlog, _GATHER)), (), socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            while sent and backlog:
                chunk = backlog[0]
                if sent < len(chunk):
                    backlog[0] = chunk[sent:]
                    return  # the socket took what it could
                sent -= len(chunk)
                backlog.popleft()
