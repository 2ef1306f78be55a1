"""The consuming skeleton the worker and the collector share: one connection, one channel,
an inbox of deliveries for threads of their own, and the acks and forwards that settle them.

- the loop thread (:class:`~amqprpc.transport.ioloop.AmqpLoop`, held here) declares the queues the
  owner names, consumes them on one channel with a prefetch, and puts every delivery in
  :attr:`Consumer.inbox` as ``(generation, message)``;
- the owner's threads take them from the inbox and hand back how each is settled: an ack,
  or a :class:`~amqprpc.transport.redelivery.Forward` (retry, dead letter) published on the
  forwarder's confirm channel, the original acked once the broker confirmed the copy;
- a lost connection forgets what no thread has taken (the broker redelivers it), and the
  acks of the dead channel's deliveries are dropped by their generation;
- a warm stop cancels the consumers first; what was prefetched but not taken is requeued
  (or left for the owner's threads to finish).

A worker's handler threads also read (:meth:`Consumer.lend_to_threads`, leader/follower, the
:class:`~amqprpc.transport.readtoken.ReadToken` the client's callers use): while the worker is
quiet -- nothing in the inbox, no handler running, no copy awaiting its confirm, no queued loop
work -- the loop lends its socket and wakes the idle thread that went idle last to lead
(:meth:`Consumer.next_delivery`). It reads and dispatches what arrives; once a delivery is in
the inbox it releases the token and runs that delivery itself (nobody else is woken), then leads
again. One call at a time the worker then sleeps once per call, like a single-threaded server.
When it takes a delivery while the worker is not quiet (more waiting, other handlers running: a
burst) it hands the socket back to the loop, which reads as before until the worker is quiet
again. The loop takes the socket back for anything else it does (queued work: consumer cancels,
forwards, stopping; dead links; reconnects), and when the token stayed free for a lease (a
handler that runs longer than :data:`~amqprpc.transport.readtoken.LEASE` while deliveries may
arrive). TLS connections are never lent.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, Iterator

import amqp
from kombu import Queue

from amqprpc import logs
from amqprpc.transport.inbox import LEAD, Inbox
from amqprpc.transport.ioloop import AmqpLoop
from amqprpc.transport.readtoken import ReadToken
from amqprpc.transport.redelivery import Forward, Forwarder, Redelivery
from amqprpc.wire.envelope import ARRIVED_PROPERTY

log = logs.get_logger("amqprpc.consumer")

STOP = object()  # put in the inbox once per owner thread to end it


class Consumer:
    """Consume the queues ``declare(connection, channel)`` declares -- it returns the channel
    to go on with and ``{consumer tag: queue}`` -- with ``prefetch`` unacked deliveries at
    most; ``redelivery`` builds the bare dead letter for a copy that cannot be encoded.
    Other parameters go to :class:`~amqprpc.transport.ioloop.AmqpLoop`."""

    def __init__(self, url: str, *, name: str, prefetch: int, redelivery: Redelivery,
                 declare: Callable[[Any, amqp.Channel], tuple[amqp.Channel, dict[str, Queue]]],
                 heartbeat: float = 30.0, reconnect_cap: float = 10.0):
        self.loop = AmqpLoop(url, name=name, heartbeat=heartbeat, reconnect_cap=reconnect_cap,
                             on_connected=self._connected, on_disconnected=self._disconnected,
                             keep_consuming=self._keep_consuming, on_channel_closed=self._channel_closed)
        self.prefetch = prefetch
        self.redelivery = redelivery
        self.declare = declare
        self.forwarder = Forwarder()
        self.channel: amqp.Channel | None = None
        self.inbox = Inbox()  # wakes one thread per delivery (see amqprpc.inbox)
        self.received = 0  # only ever written on the loop thread
        self.channel_losses = 0  # consuming channels the broker closed (consumer_timeout...)
        self._tags: list[str] = []
        self._consuming = False
        self._stopping = False  # a reconnect during a warm stop must not consume again
        self.token: ReadToken | None = None  # set by lend_to_threads
        self._busy: Callable[[], int] = lambda: 0

    def lend_to_threads(self, busy: Callable[[], int]) -> ReadToken:
        """Let the owner's idle threads read the socket while it is quiet (see the module);
        ``busy()`` counts the deliveries they are running. Before :meth:`start`."""
        self._busy = busy
        self.token = self.loop.lender = ReadToken(self.loop, self._may_lend, on_lend=self.inbox.nudge,
                                                       prompt=True)
        return self.token

    def _may_lend(self) -> bool:
        """(loop thread) Nothing but idle threads waits: no delivery waiting or running, no
        copy awaiting its confirm, consuming and not stopping."""
        return (self._consuming and not self._stopping and not self.inbox.qsize() and not self._busy()
                and self.forwarder.idle.is_set())

    # --- loop thread -------------------------------------------------------------------
    def _connected(self, connection: Any) -> None:
        channel, queues = self.declare(connection, connection.channel())
        # The dead-letter and delay queues are declared on first use (Forward.declare): a
        # consumer that never fails leaves nothing behind on the broker.
        self.forwarder.connect(connection)
        channel.basic_qos(0, self.prefetch, False)
        self.channel = channel
        if self._stopping:
            return
        self._tags = list(queues)
        for tag, declared in queues.items():
            self.loop.consume(channel, declared, self._on_message, consumer_tag=tag)
        self._consuming = True

    def _keep_consuming(self, consumer_tag: str) -> bool:
        return self._consuming and not self._stopping

    def _channel_closed(self, channel: amqp.Channel, error: BaseException) -> bool:
        """The broker closed a channel (loop thread): without the consuming one nothing
        arrives any more, without the forwarder's nothing is retried or dead-lettered, so
        the connection is started afresh (True): queues declared and consumed again on a
        fresh channel, after a backoff that grows while it keeps happening. What was delivered
        on the closed channel and not acked is back in its queue already; the handlers
        still running it finish, and their acks are dropped (by generation): it runs again
        (at-least-once). RabbitMQ's ``consumer_timeout`` (406 PRECONDITION_FAILED) does
        this to a handler that runs longer (see docs/guides/long-tasks.md)."""
        if channel is self.channel:
            what = "consuming"
        elif channel is self.forwarder.channel:
            # Replacing it alone would requeue its originals, redelivered at once to fail the
            # same way (a dead letter the user may not publish): a fresh connection, backed off.
            what = "forwarding"
        else:
            return False  # a declare's own channel: its error went to the declare
        log.error(f"the broker closed the {what} channel; consuming again on a fresh connection",
                  reply_code=getattr(error, "reply_code", None), reply_text=getattr(error, "reply_text", str(error)))
        self.channel_losses += 1
        return True

    def _disconnected(self, exc: BaseException | None) -> None:
        # Unacked deliveries of the dead channel are redelivered by the broker; the owner's
        # threads still working finish on the next connection, their acks dropped.
        with self.loop.write_lock:
            self.channel = None
        self.forwarder.disconnected()
        # What no thread has taken yet is back in the queue already: running it now would
        # only make a duplicate whose ack is dropped.
        dropped = sum(1 for _ in self.take_unstarted())
        if dropped:
            log.info("dropped unstarted messages of the lost connection", count=dropped)

    def _on_message(self, message: amqp.Message) -> None:
        self.received += 1
        # When it reached this host: a request's remaining time counts from here, not from
        # when a thread got to it (envelope.Request.deadline); never sent on (redelivery._copy).
        message.properties[ARRIVED_PROPERTY] = time.time()
        self.inbox.put((self.loop.generation, message))

    def stop_consuming(self, done: threading.Event, requeue: bool) -> None:
        """Cancel the consumers (loop thread); after CancelOk nothing more arrives. With
        ``requeue``, give back what no thread has taken."""
        try:
            self._stopping = True
            if self.channel is not None and self._consuming:
                self._consuming = False
                for tag in self._tags:
                    self.channel.basic_cancel(tag)
            if requeue:
                requeued = 0
                for generation, message in self.take_unstarted():
                    if generation == self.loop.generation and self.channel is not None:
                        self.channel.basic_reject(message.delivery_tag, requeue=True)
                        requeued += 1
                if requeued:
                    log.info("requeued prefetched messages", count=requeued)
        finally:
            done.set()

    def settle(self, channel: amqp.Channel, generation: int, message: amqp.Message, forward: Forward | None,
               bared: Callable[[], None] | None = None) -> None:
        """Ack ``message``, or publish ``forward`` and ack once it is confirmed (loop
        thread, or any thread under the write lock for a plain ack). A delivery of an
        earlier connection is dropped: the broker has requeued it already. When the copy
        cannot be encoded, a bare dead letter (``UnencodableCopy``) goes instead and
        ``bared()`` is called (the owner counts a dead letter where it counted a retry)."""
        if generation != self.loop.generation:
            return
        if forward is None:
            channel.basic_ack(message.delivery_tag)
            return

        def bare(reason: str) -> Forward:
            if bared is not None:
                bared()
            return self.redelivery.dead_letter(message, forward.queue, reason, "UnencodableCopy", keep_headers=False)

        self.forwarder.forward(channel, message.delivery_tag, forward, bare)

    # --- the owner's threads ------------------------------------------------------------
    def next_delivery(self) -> Any:
        """The next item of the inbox for an owner's thread (lend_to_threads): taken at once,
        or read from the socket by this thread as the leader while the socket is lent, or
        waited for as before."""
        inbox, token = self.inbox, self.token
        if token is None:
            return inbox.get()
        while True:
            item = inbox.take()
            if item is not None:
                return item
            if token.take():
                inbox.begin_lead()
                try:
                    token.read_until(inbox.qsize)
                finally:
                    item = inbox.end_lead()
                if item is not None:
                    if inbox.qsize() or self._busy():  # not quiet (a burst): the loop reads as before
                        token.back_off()
                        self.loop.call_soon(_nothing)
                    return item
                token.want = True  # the loop took the socket back: it lends again once quiet
            elif not token.lent and token.lendable and not self._busy() and not inbox.qsize():
                # Quiet, and the loop reads: it lends once it looks (it sleeps in poll()).
                if token.ask():
                    self.loop._wake()
            item = inbox.get()
            if item is not LEAD:
                return item

    # --- any thread --------------------------------------------------------------------
    def take_unstarted(self) -> Iterator[tuple[int, amqp.Message]]:
        """Empty the inbox of the deliveries no thread has taken; STOP sentinels stay."""
        taken, sentinels = [], 0
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                break
            if item is STOP:
                sentinels += 1
            else:
                taken.append(item)
        for _ in range(sentinels):  # still owed to the owner's threads
            self.inbox.put(STOP)
        return iter(taken)

    def start(self, broker_wait: float, on_connect_retry: Callable[[int, float, BaseException], None] | None) -> None:
        self.loop.startup_wait = broker_wait
        self.loop.on_connect_retry = on_connect_retry
        self.loop.start()

    def flush(self, timeout: float) -> None:
        """Let what the loop was handed run, then the forwarder's confirms arrive (retries
        and dead letters acked), for at most ``timeout`` seconds (at least one)."""
        flushed = threading.Event()
        self.loop.call_soon(flushed.set)
        if flushed.wait(5.0):
            self.forwarder.idle.wait(max(1.0, timeout))


def _nothing() -> None:
    """Queued loop work: the loop takes a lent socket back to run it (readtoken)."""
