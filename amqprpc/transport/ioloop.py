"""The one thread that owns an AMQP connection.

py-amqp connections are not thread-safe, so every worker and client has exactly one
:class:`AmqpLoop`: it connects, reads frames, sets up channels and sends heartbeats.
Other threads hand it work with :meth:`AmqpLoop.call_soon`, which appends to a deque
and wakes the loop through a pipe; the loop sleeps in ``poll()`` on the socket and that
pipe, so nothing on the request/reply path sleeps or polls on a timer.

The one exception, for speed: a publish or an ack may be written by another thread
while it holds :attr:`AmqpLoop.write_lock`, which every frame written on the connection
takes (see ``_lock_frames``); a thread that finds it taken hands the write to the loop.
And a client's loop lends its socket to blocking callers while only they wait for the
broker: each reads its own reply (:mod:`~amqprpc.transport.readtoken`); a worker's, to an idle
handler thread while the worker is quiet: it runs what it reads.

No wait on the loop thread is unbounded (:class:`~amqprpc.transport.link.Link`): writes never
block (what the socket does not take waits in a backlog the loop sends when it can),
reads outside the loop's own ``poll()`` give up when the broker is silent too long, a
link silent for two heartbeat intervals is dead, and a dead link is dropped without a
close handshake.
"""
from __future__ import annotations

import collections
import math
import os
import select
import ssl
import struct
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

import amqp
from amqp import spec
from amqp.exceptions import FrameSyntaxError
from amqp.serialization import dumps
from kombu import Connection

from amqprpc.transport import channels, framehandler
from amqprpc.transport.channels import close_quietly as close_quietly  # re-exported: their home was here
from amqprpc.transport.channels import open_confirm_channel as open_confirm_channel
from amqprpc import logs
from amqprpc.transport.backoff import full_jitter
from amqprpc.config import redact, ssl_options
from amqprpc.errors import StartCancelled as StartCancelled  # re-exported: its home was here
from amqprpc.transport.link import Link, describe

if TYPE_CHECKING:
    from amqprpc.transport.readtoken import ReadToken


class ChannelLost(ConnectionError):
    """The broker closed a channel its owner cannot go on without (a consumer's): the
    connection is started afresh, which declares and consumes again."""

    def __init__(self, channel_id: int, error: BaseException):
        super().__init__(f"the broker closed channel {channel_id}: {channels.reason(error)}")
        self.error = error

log = logs.get_logger("amqprpc.ioloop")

_READ = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP  # socket events that mean "read"

# What py-amqp raises for a message it cannot encode (a routing key or short string over 255
# bytes, a header value it has no type for, a str body with a content_encoding that is no
# codec): always before any byte of the message is written, so the connection is fine and
# a retry fails the same.
UNENCODABLE = (struct.error, UnicodeError, LookupError, ValueError, TypeError, OverflowError, FrameSyntaxError)


def publish(channel: amqp.Channel, message: amqp.Message, exchange: str, routing_key: str,
            mandatory: bool = False) -> None:
    """``basic_publish`` without py-amqp's per-publish ``drain_events(timeout=0)``.

    py-amqp drains the socket inside every publish when ``connection.blocked`` is
    negotiated; called from a delivery callback that drain runs the next delivery's
    callback recursively, and so on without bound while deliveries keep coming. Our loop
    drains the socket itself, so the publish only needs to write the frames. (What
    ``channel.send_method`` does, minus its promise and re-encoding the same arguments.)
    """
    connection = channel.connection
    if connection is None:
        raise amqp.exceptions.RecoverableConnectionError("connection already closed")
    key = (exchange, routing_key, mandatory)
    args = _publish_args.get(key)
    if args is None:
        args = dumps("Bssbb", (0, exchange, routing_key, mandatory, False))  # UNENCODABLE raised here
        if len(_publish_args) >= _PUBLISH_ARGS_KEPT:
            _publish_args.clear()  # many reply queues over time: start again rather than grow
        _publish_args[key] = args
    try:
        connection.frame_writer(1, channel.channel_id, _BASIC_PUBLISH, args, message)
    except StopIteration:
        raise amqp.exceptions.RecoverableConnectionError("connection already closed") from None


_BASIC_PUBLISH, _PUBLISH_ARGS_KEPT = spec.Basic.Publish, 4096
_publish_args: dict[tuple[str, str, bool], bytes] = {}  # encoded Basic.Publish arguments; dict ops are atomic


def _broker_not_there_yet(exc: BaseException) -> bool:
    """Whether a failed first connection may succeed later: refused, reset, timed out, name
    not resolvable yet, the broker closing connections while it boots. Not bad credentials,
    a missing vhost, a TLS certificate refused or queues declared with other arguments: those
    need a person, and a daemon exits for them at once."""
    if isinstance(exc, ssl.SSLError):
        return False
    return isinstance(exc, (OSError, amqp.exceptions.RecoverableConnectionError))
# A channel whose publishes the broker refuses (nack) is replaced once it is this old: one
# opened while a quorum queue's leader was being elected stays refused for its whole life,
# while a fresh one works. Younger ones are kept, so a channel opened during an election
# is not churned a hundred times a second.
REFUSED_CHANNEL_MIN_AGE_S = 1.0


def channel_refused(opened: float) -> bool:
    """After a nack: whether the channel opened at monotonic ``opened`` is to be replaced."""
    return time.monotonic() - opened >= REFUSED_CHANNEL_MIN_AGE_S


CONNECT_TIMEOUT = 5.0  # seconds, per connection attempt (TCP, TLS and AMQP handshakes), by default


class AmqpLoop:
    """Owns one kombu connection in one thread; reconnects with jittered backoff.

    Held (not inherited) by the client, the worker and the collector, which pass their
    callbacks, all run on the loop thread: ``on_connected(connection)`` declares topology
    and starts consuming (with :meth:`consume`), ``on_disconnected(exc)`` fails or forgets
    what the dead connection carried (it runs as soon as the link is found dead, before the
    socket is dropped; ``exc`` None when stopping), ``keep_consuming(tag)`` says whether a
    consumer the broker cancelled is still wanted (default: until stopping),
    ``on_channel_closed(channel, error)`` replaces a channel the broker closed
    (:mod:`~amqprpc.transport.channels`) and returns True when the owner cannot go on
    without it: the connection is then started afresh (default: False).

    Parameters: ``heartbeat`` and ``connect_timeout`` in seconds; ``reconnect_base`` and
    ``reconnect_cap`` bound the backoff between reconnect attempts, in seconds.

    At start (daemons): :meth:`start` fails with the first connection error unless
    ``startup_wait`` (seconds, ``math.inf`` for ever) is set: then an unreachable broker
    is retried with the same backoff, each attempt logged and passed to
    ``on_connect_retry(attempt, retry_in, exc)``, until it answers, the wait is over, or
    :meth:`cancel_start` gives up (``start`` then raises :class:`StartCancelled`).
    """

    def __init__(self, url: str, *, name: str, heartbeat: float = 30.0, connect_timeout: float = CONNECT_TIMEOUT,
                 reconnect_base: float = 0.2, reconnect_cap: float = 10.0,
                 on_connected: Callable[[Connection], None] | None = None,
                 on_disconnected: Callable[[BaseException | None], None] | None = None,
                 keep_consuming: Callable[[str], bool] | None = None,
                 on_channel_closed: Callable[[amqp.Channel, BaseException], bool] | None = None):
        self.url = url
        self.on_connected: Callable[[Connection], None] = on_connected or (lambda connection: None)
        self.on_disconnected: Callable[[BaseException | None], None] = on_disconnected or (lambda exc: None)
        self.keep_consuming: Callable[[str], bool] = keep_consuming or (lambda tag: not self._stopping)
        self.on_channel_closed: Callable[[amqp.Channel, BaseException], bool] = (
            on_channel_closed or (lambda channel, error: False))
        self.channels_closed = 0  # by the broker, on any connection of this loop
        self._channel_losses, self._channel_lost_at = 0, -math.inf  # reconnects for a vital channel closed
        self.name = name
        self.heartbeat = heartbeat
        self.connect_timeout = connect_timeout
        self.reconnect_base = reconnect_base
        self.reconnect_cap = reconnect_cap
        self.connection: Connection | None = None
        # Held while any frame is written and while a subclass checks-then-uses its
        # channels from another thread (see :meth:`_lock_frames`). Reentrant: such a
        # section itself writes frames.
        self.write_lock = threading.RLock()
        self.generation = 0  # bumped on every (re)connect; stale delivery tags are dropped
        # Connections that were set up and served. A set-up that failed and was retried
        # bumped the generation but counts once here: e.g. the broker still holding a dead
        # connection's exclusive reply queue (RESOURCE_LOCKED) until its own heartbeat ends it.
        self.connects = 0
        self.connected = threading.Event()
        self._ops: collections.deque[Any] = collections.deque()
        self._signaled = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        # Guards the pipe's write end against being closed (when the thread ends) while
        # another thread wakes the loop: a write to a closed descriptor's number could land
        # in whatever file the process opened next under that number.
        self._wake_lock = threading.Lock()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self.link: Link | None = None
        self.startup_wait = 0.0
        self.on_connect_retry: Callable[[int, float, BaseException], None] | None = None
        self._start_cancelled = False
        self.lender: ReadToken | None = None  # blocking callers or idle handler threads may read the socket

    # --- loop thread: consuming ----------------------------------------------------------
    def consume(self, channel: amqp.Channel, queue: Any, callback: Callable[..., Any], *, consumer_tag: str = "",
                no_ack: bool = False) -> str:
        """Declare ``queue`` (a kombu Queue) and consume it on ``channel``.

        The broker may cancel a consumer on its own (basic.cancel: the queue was deleted,
        the node of a classic queue went down, a quorum queue's consumer timed out). Then
        the queue is declared and consumed again, on this thread, on the same channel (so
        unacked deliveries can still be acked); if that fails the connection is started
        afresh (the loop's reconnect, with backoff), never left without a consumer.
        """
        queue(channel).declare()
        generation = self.generation

        def on_cancel(tag: str) -> None:
            log.warning("broker cancelled a consumer; consuming again", queue=queue.name, consumer_tag=tag)
            # Not from inside this frame's dispatch: declaring waits for replies.
            self.call_soon(again, tag)

        def again(tag: str) -> None:
            if generation == self.generation and channel.is_open and self.keep_consuming(tag):
                self.consume(channel, queue, callback, consumer_tag=tag, no_ack=no_ack)
                log.info("consuming again", queue=queue.name, consumer_tag=tag)

        tag: str = channel.basic_consume(queue=queue.name, consumer_tag=consumer_tag, no_ack=no_ack, callback=callback,
                                         on_cancel=on_cancel)
        return tag

    # --- any thread --------------------------------------------------------------------
    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop thread, in order. Safe from any thread."""
        self._ops.append((fn, args))
        # One byte per wake-up, not per call: the flag is cleared by the loop *before* it
        # empties the deque, so an append that sees it set is always drained after.
        if not self._signaled:
            self._wake()

    def _wake(self) -> None:
        """Wake the loop's ``poll()`` (any thread)."""
        self._signaled = True
        with self._wake_lock:
            if self._wake_w < 0:
                return  # the thread ended: nothing reads the pipe any more
            try:
                os.write(self._wake_w, b"x")
            except BlockingIOError:
                pass

    def _close_pipe(self) -> None:
        """The wake-up pipe's two descriptors, once the thread ends (a client per request
        would otherwise run out of descriptors after a few hundred)."""
        with self._wake_lock:
            read_end, write_end, self._wake_r, self._wake_w = self._wake_r, self._wake_w, -1, -1
            if self.lender is not None:
                self.lender.close()
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)

    def cork(self) -> Any:
        """Holding ``write_lock``: collect the frames written from now on and send them in
        one write at :meth:`uncork`, before the lock is released (e.g. a reply and its ack:
        one syscall, and the lock held for one send instead of two). Returns a token for it.
        Never across a wait for the broker: what it waits for would not leave."""
        link = self.link
        writer = link.writer if link is not None else None
        if writer is None or writer.corked:  # TLS, no connection, or already collecting
            return None
        writer.cork()
        return writer

    @staticmethod
    def uncork(token: Any) -> None:
        """Holding ``write_lock`` still: send what was collected since :meth:`cork`."""
        if token is not None:
            token.uncork()

    def start(self) -> None:
        """Start the thread and wait for the first connection; raise what prevented it.
        Once only: a loop is not restarted."""
        if self._thread is not None:
            raise RuntimeError(f"{self.name}: already started")
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            self._thread.join()
            raise self._start_error

    def cancel_start(self) -> None:
        """Stop waiting for the first connection: :meth:`start` raises StartCancelled.
        No effect once connected (stop that with :meth:`stop`). Safe from a signal handler."""
        self._start_cancelled = True
        self.call_soon(lambda: None)

    def stop(self, timeout: float | None = 10.0) -> None:
        """Run what is queued, close the connection and end the thread."""
        self._stopping = True
        self.call_soon(lambda: None)
        if self._thread is None:
            self._close_pipe()  # never started: nothing else would close it
        elif self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- loop thread -------------------------------------------------------------------
    def _connect(self) -> Connection:
        conn = Connection(self.url, heartbeat=self.heartbeat, connect_timeout=self.connect_timeout,
                          failover_strategy="round-robin", ssl=ssl_options(self.url))
        # One attempt per listed host (``amqp://h1;amqp://h2``); our own loop does the backoff.
        conn.ensure_connection(max_retries=max(len(conn.alt), 1) - 1, interval_start=0, interval_step=0,
                               interval_max=0, reraise_as_library_errors=False)
        return conn

    def _lock_frames(self, amqp_conn: Any) -> None:
        """Serialize every frame written on this connection with :attr:`write_lock`.

        Reading, (re)connecting and channel set-up stay on the loop thread; writing a
        publish or an ack is safe from any thread once frames cannot interleave. py-amqp
        >= 5.3 also locks its frame buffer; ours makes it hold for older versions too and
        lets a caller publish, or a handler thread reply and ack, without waking the loop.
        """
        write, lock = amqp_conn.frame_writer, self.write_lock

        def locked_frame_writer(*args: Any) -> Any:
            with lock:
                return write(*args)

        amqp_conn.frame_writer = locked_frame_writer

    def _run(self) -> None:
        try:
            self._serve_until_stopped()
        finally:
            self._close_pipe()

    def _serve_until_stopped(self) -> None:
        attempt = 0
        give_up_at = time.monotonic() + self.startup_wait
        while not self._stopping:
            try:
                self._open()
            except Exception as exc:  # noqa: BLE001 - any failure to connect is retried or reported
                self._drop(graceful=False)
                delay = full_jitter(attempt, self.reconnect_base, self.reconnect_cap)
                starting = not self._started.is_set()
                if starting and (self._start_cancelled or not _broker_not_there_yet(exc)
                                 or time.monotonic() + delay > give_up_at):
                    self._start_error = StartCancelled() if self._start_cancelled else exc
                    self._started.set()
                    return
                attempt += 1
                log.warning("broker connect failed", url=redact(self.url), error=redact(describe(exc)),
                            error_type=type(exc).__name__, attempt=attempt, retry_in=round(delay, 3))
                if starting and self.on_connect_retry is not None:
                    self.on_connect_retry(attempt, delay, exc)
                self._idle(delay)
                continue
            if self._started.is_set():
                log.info("broker reconnected", url=redact(self.url), generation=self.generation)
            attempt = 0
            self.connects += 1
            self.connected.set()
            self._started.set()
            try:
                self._serve()
            except Exception as exc:  # noqa: BLE001 - connection or channel failure: reconnect
                self.connected.clear()
                log.warning("broker connection lost", url=redact(self.url), error=redact(describe(exc)),
                            error_type=type(exc).__name__)
                # What the dead connection carried fails now; the socket is dropped after,
                # without a close handshake a dead broker would never answer.
                self.on_disconnected(exc)
                self._drop(graceful=False)
                if isinstance(exc, ChannelLost):
                    # The same fault may close the next connection's channel at once (a
                    # reply the user may not publish): back off as for a failed connect.
                    now = time.monotonic()
                    self._channel_losses = self._channel_losses + 1 if now - self._channel_lost_at < 60 else 0
                    self._channel_lost_at = now
                    self._idle(full_jitter(self._channel_losses, self.reconnect_base, self.reconnect_cap))
                continue
        self._run_ops()
        self.connected.clear()
        self._drop(graceful=True)
        self.on_disconnected(None)
        self._run_ops()
        if not self._started.is_set():  # stopped while still waiting for the first connection
            self._start_error = StartCancelled()
            self._started.set()

    def _open(self) -> None:
        self.connection = self._connect()
        amqp_conn = self.connection.connection
        channels.install(amqp_conn, self._channel_closed)
        framehandler.install(amqp_conn)
        self._lock_frames(amqp_conn)
        # From here on no read or write on this connection waits without a bound, the
        # channel set-up below included.
        self.link = Link(amqp_conn, self.write_lock, self._wake)
        self.generation += 1
        self.on_connected(self.connection)

    def _serve(self) -> None:
        link, connection = self.link, self.connection
        assert link is not None and connection is not None  # _connect set both before serving
        reader = link.reader
        drain = reader.events_of(connection.connection)
        sock_fd = link.sock.fileno()
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        mask = link.poll_mask()
        poller.register(sock_fd, mask)
        lender = self.lender
        while not self._stopping:
            if lender is not None and lender.want:  # lent to blocking callers until needed back
                lender.lend(link)
            if link.poll_mask() != mask:  # a write left a backlog (POLLOUT), or it is gone
                mask = link.poll_mask()
                poller.modify(sock_fd, mask)
            due = link.due()
            timeout_ms = None if due is None else max(0, int((due - time.monotonic()) * 1000) + 1)
            if reader.buffered:
                timeout_ms = 0  # a channel method's wait on this thread left frames in the buffer
            events = poller.poll(timeout_ms)
            if self._ops or self._signaled:
                self._run_ops()
            readable = reader.buffered
            for fd, event in events:
                if fd == sock_fd:
                    if event & select.POLLOUT:
                        link.flush()
                    if event & _READ:
                        readable = True
            now = time.monotonic()
            if readable:
                link.last_received = now
                # Dispatch every frame already here without waiting.
                reader.drain(drain)
            link.check(now)

    def _channel_closed(self, channel: amqp.Channel, error: BaseException) -> None:
        """Inside the Close frame's dispatch: say so, and let the owner act from the loop
        (replacing a channel waits for the broker's answers)."""
        self.channels_closed += 1
        log.warning("broker closed a channel", channel=getattr(channel, "closed_id", None),
                    reply_code=getattr(error, "reply_code", None),
                    reply_text=getattr(error, "reply_text", str(error)), method=getattr(error, "method_name", None))
        self.call_soon(self._after_channel_closed, self.generation, channel, error)

    def _after_channel_closed(self, generation: int, channel: amqp.Channel, error: BaseException) -> None:
        if generation != self.generation or self.connection is None or self._stopping:
            return  # the connection it belonged to is gone already
        if self.on_channel_closed(channel, error):
            raise ChannelLost(getattr(channel, "closed_id", 0), error)

    def _run_ops(self) -> None:
        try:
            os.read(self._wake_r, 4096)
        except BlockingIOError:
            pass
        self._signaled = False
        ops = self._ops
        while ops:
            fn, args = ops.popleft()
            fn(*args)

    def _idle(self, seconds: float) -> None:
        """Wait between reconnect attempts, still running queued work (which fails fast
        while disconnected) and waking at once on stop."""
        deadline = time.monotonic() + seconds
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        while not self._stopping and not (self._start_cancelled and not self._started.is_set()):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            poller.poll(int(left * 1000) + 1)
            self._run_ops()

    def _drop(self, graceful: bool) -> None:
        """Close the connection; ``graceful`` (stopping) waits briefly for the broker's
        Close-Ok, otherwise the socket just goes (see :meth:`Link.close`)."""
        conn, link, self.connection, self.link = self.connection, self.link, None, None
        if link is not None:
            link.close(graceful)
        elif conn is not None:  # failed while connecting: nothing to say to the broker
            try:
                conn.collect()
            except Exception:  # noqa: BLE001 - already broken; nothing to save
                pass
