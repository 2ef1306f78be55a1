"""One connection's link to the broker, as its loop thread keeps it: frame I/O that never
waits without a bound, heartbeats, dead-link detection, closing without waiting on a dead
broker, and errors that say what happened.

Why a link is declared dead by its silence: a stalled path (a stuck proxy or load balancer,
a blackholed route) keeps the socket open and reports no error for as long as TCP retries
(about 15 minutes on Linux). RabbitMQ sends a heartbeat every half heartbeat interval when
it has nothing else to send, so a link that brought nothing for two heartbeat intervals is
dead. py-amqp's ``heartbeat_tick`` has that threshold too but only notices when it is
called, and measures from the call before: detection took up to 2.5 intervals, plus
whatever the loop thread was blocked in. Here the loop wakes at the exact limit, and every
wait for the broker on the loop thread (a channel method's reply, the rest of a frame,
the close handshake) is bounded by the same limit.
"""
from __future__ import annotations

import errno
import os
import select
import socket
import threading
import time
from typing import Any, Callable

from amqp.exceptions import AMQPError
from amqp.transport import TCPTransport

from amqprpc.transport.framereader import FrameReader, LinkClosed, TimeoutReads
from amqprpc.transport.framewriter import FrameWriter

# With heartbeats off nothing is heard from an idle broker; a wait for an answer (a
# declare, a consume) still ends after this long.
NO_HEARTBEAT_WAIT = 60.0
# How long a graceful close waits for the broker's Close-Ok before it drops the socket.
CLOSE_TIMEOUT = 1.0

_READ = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP


class LinkDead(ConnectionError):
    """Nothing came from the broker for longer than the link allows: the link is dead."""


class Link:
    """The socket of one connected py-amqp ``connection``, for its loop thread.

    ``write_lock`` is the loop's (every frame is written under it); ``wake`` wakes the
    loop's ``poll()`` when a write left a backlog for it to send.
    """

    def __init__(self, connection: Any, write_lock: threading.RLock, wake: Callable[[], None]):
        self.connection = connection
        self.heartbeat = float(connection.heartbeat or 0)  # as negotiated
        self.silence = 2.0 * self.heartbeat if self.heartbeat else None
        transport = connection.transport
        self.sock: socket.socket = transport.sock
        self._lock = write_lock
        if type(transport) is TCPTransport:
            reader = FrameReader(transport, self.wait_readable, connection.frame_max)
            reader.watch_dispatch(connection)
            self.reader: FrameReader | TimeoutReads = reader
            self.writer: FrameWriter | None = FrameWriter(transport, wake)
        else:  # TLS: py-amqp's own reads and writes (see framereader), bounded by the socket's timeout
            self.reader, self.writer = TimeoutReads(), None
            self.sock.settimeout(self.silence or NO_HEARTBEAT_WAIT)
        now = time.monotonic()
        self.last_received = now
        self._check_every = self.heartbeat / 4  # (0 without heartbeats: then nothing is checked)
        self._next_check = now + self._check_every
        self._sent_count, self._sent_at = connection.bytes_sent, now
        self._wait_limit: float | None = None

    # --- the loop's poll() -----------------------------------------------------------
    def poll_mask(self) -> int:
        return _READ | select.POLLOUT if self.writer is not None and self.writer.backlog else _READ

    def due(self) -> float | None:
        """When the loop must wake for this link: a heartbeat check, or the silence limit."""
        if self.silence is None:
            return None
        return min(self._next_check, self.last_received + self.silence)

    def flush(self) -> None:
        """Write what the backlog holds, as far as the socket takes it (it was writable)."""
        if self.writer is not None:
            with self._lock:
                self.writer.flush()

    def check(self, now: float) -> None:
        """Raise :class:`LinkDead` when the broker was silent too long; send a heartbeat
        when nothing was sent for half the interval (checked every quarter, as py-amqp)."""
        if self.silence is None:
            return
        if now - self.last_received >= self.silence:
            raise LinkDead(f"nothing from the broker for {now - self.last_received:.1f}s "
                           f"(heartbeat {self.heartbeat:g}s): the link is dead")
        if now >= self._next_check:
            self._next_check = now + self._check_every
            sent = self.connection.bytes_sent
            if sent != self._sent_count:
                self._sent_count, self._sent_at = sent, now
            elif now - self._sent_at >= self.heartbeat / 2:
                self.connection.send_heartbeat()
                self._sent_count, self._sent_at = self.connection.bytes_sent, now

    # --- waits on the loop thread ----------------------------------------------------
    def wait_readable(self) -> None:
        """Until the socket has something to read. Meanwhile the backlog is written and
        heartbeats are sent; raises :class:`LinkDead` once the broker was silent for the
        link's limit (two heartbeats, or ``NO_HEARTBEAT_WAIT`` without heartbeats, or
        less while closing)."""
        start = time.monotonic()
        limit = self.last_received + self.silence if self.silence else start + NO_HEARTBEAT_WAIT
        if self._wait_limit is not None:
            limit = min(limit, start + self._wait_limit)
        poller = select.poll()
        fd = self.sock.fileno()
        while True:
            now = time.monotonic()
            if now >= limit:
                raise LinkDead(f"no answer from the broker within {now - start:.1f}s: the link is dead")
            poller.register(fd, self.poll_mask())
            until = limit if self.silence is None else min(limit, self._next_check)
            for _, event in poller.poll(max(0, int((until - now) * 1000)) + 1):
                if event & select.POLLOUT:
                    self.flush()
                if event & _READ:
                    self.last_received = time.monotonic()
                    return
            self.check(time.monotonic())

    # --- closing ---------------------------------------------------------------------
    def close(self, graceful: bool) -> None:
        """Close the AMQP connection: with ``graceful`` send Close and wait at most
        ``CLOSE_TIMEOUT`` for Close-Ok; then (at once when not graceful) drop the socket.
        Never raises."""
        if graceful:
            self._wait_limit = CLOSE_TIMEOUT
            if self.writer is None:  # TLS: py-amqp's blocking reads honour the socket timeout
                try:
                    self.sock.settimeout(CLOSE_TIMEOUT)
                except OSError:
                    pass
            try:
                self.connection.close()
            except Exception:  # noqa: BLE001 - broken or slow: dropped below either way
                pass
        try:
            with self._lock:
                self.connection.collect()  # closes the socket; no network I/O
        except Exception:  # noqa: BLE001 - already gone
            pass


def describe(exc: BaseException) -> str:
    """What happened to a connection, in words: timed out, reset, refused, closed by the
    broker (with its reply code and text), dead by silence..."""
    if isinstance(exc, (LinkDead, LinkClosed)):
        return str(exc)
    if isinstance(exc, AMQPError) and exc.method_sig is not None:  # from a Connection/Channel.Close
        return f"closed by the broker: {exc.reply_code} {exc.reply_text}"
    code = getattr(exc, "errno", None)
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused ({exc.strerror or exc})"
    if isinstance(exc, ConnectionResetError):
        return "connection reset by the peer (ECONNRESET)"
    if isinstance(exc, BrokenPipeError):
        return "connection broken (EPIPE: the peer is gone)"
    if isinstance(exc, (socket.timeout, TimeoutError)):  # one class since 3.10; ETIMEDOUT is a TimeoutError
        if code == errno.ETIMEDOUT:
            return "timed out: the network stopped delivering (ETIMEDOUT)"
        detail = str(exc)
        return "timed out: no answer in time" if detail in ("", "timed out") else f"timed out ({detail})"
    if isinstance(exc, OSError) and code:
        return f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"
    return f"{type(exc).__name__}: {exc}"
