"""A worker: consumes one service's request queue and runs its handlers in a thread pool.

Threads, and why:
- the loop thread (:class:`~amqprpc.transport.ioloop.AmqpLoop`, held by the worker's
  :class:`~amqprpc.transport.consumer.Consumer`) owns the connection: it receives deliveries and keeps
  heartbeats flowing however long handlers run.
- ``concurrency`` handler threads take deliveries from an in-process queue, decode, run
  the handler, then publish the reply and ack themselves under the loop's ``write_lock``
  (or, when it is taken, hand ``(reply, ack)`` back to the loop with ``call_soon``). While
  the worker is quiet the loop lends its socket and an idle handler thread reads it, and runs
  the delivery it read itself (leader/follower,
  :meth:`~amqprpc.transport.consumer.Consumer.next_delivery`): one call at a time wakes nobody.

A message is acked only after its reply was published (at-least-once). The prefetch
bounds how many messages one worker holds unacked (per consumed queue).

Events (``@service.event``) are consumed on the same channel, one consumer per handler
(:mod:`amqprpc.server.events`), run by the same handler threads and acked once the handler returned.

Each delivery gets one :class:`Decision` (reply, forward, ack) with one
:class:`~amqprpc.outcome.Outcome`, decided in :meth:`Worker._process`: the stats and every
middleware (:mod:`amqprpc.middleware`: metrics among them) read that outcome.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Sequence

import amqp

from amqprpc import logs
from amqprpc.wire import envelope
from amqprpc.server import events
from amqprpc.server.dispatcher import UNSET, Decision, Dispatcher
from amqprpc.config import broker_url as default_broker_url
from amqprpc.transport.consumer import STOP, Consumer
from amqprpc.errors import ReplyTooLarge  # noqa: F401 - re-exported: its home was here
from amqprpc.wire.ids import new_instance_id
from amqprpc.transport.ioloop import UNENCODABLE, publish
from amqprpc.middleware import Hooks, Middleware
from amqprpc.middleware.observability import automatic
from amqprpc.outcome import Outcome, OutcomeKind
from amqprpc.middleware.idempotency import Idempotency, IdempotencyStore
from amqprpc.middleware.ping import Ping
from amqprpc.middleware.timelimit import TimeLimit
from amqprpc.middleware.revoke import RevocationStore, RevokeChecks
from amqprpc.transport.redelivery import Redelivery
from amqprpc.service import Handler, Service
from amqprpc.middleware.shared_client import SharedClient
from amqprpc.middleware.tasks import tasks_in_time
from amqprpc.middleware.workflow import Workflows
from amqprpc.wire.topology import DEFAULT_TOPOLOGY, Topology, TopologyMismatch, declare_queue, priority_mismatch

log = logs.get_logger("amqprpc.worker")


# The worker's counters each outcome adds to ("failed": every handler run or request that
# did not succeed, whatever then became of it).
_STATS_OF = {
    OutcomeKind.REPLIED: ("succeeded",), OutcomeKind.DONE: ("succeeded",), OutcomeKind.FAILED: ("failed",),
    OutcomeKind.RETRIED: ("failed", "retried"), OutcomeKind.DEAD_LETTERED: ("failed", "dead_lettered"),
    OutcomeKind.REFUSED: ("refused",), OutcomeKind.EXPIRED: ("expired",), OutcomeKind.RECOUNTED: ("recounted",),
}


def _stats_of(kind: OutcomeKind) -> tuple[str, ...]:
    """The counters an outcome adds to: a feature's own kinds (revoked, delayed...) count
    under their own name."""
    return _STATS_OF.get(kind) or (kind.value,)


class Worker:
    """Serve ``service`` from its request queue.

    Parameters: ``concurrency`` handler threads; ``prefetch`` unacked messages held at most
    (default twice the concurrency); ``max_message_bytes`` larger bodies are refused;
    ``max_reply_bytes`` larger results are answered with a ``ReplyTooLarge`` error (the
    broker closes the channel on a message above its ``max_message_size``, 16 MiB by
    default in RabbitMQ 4, and the request would come back);
    ``heartbeat`` and ``reconnect_cap`` (the longest wait between reconnect attempts)
    seconds; ``queue_type`` "classic" or "quorum"; ``max_redeliveries`` a
    message redelivered more often (its handler keeps killing the worker) is dead-lettered unrun;
    ``registry`` a :class:`~amqprpc.ops.registry.Registry` to announce this instance in every
    ``registry_interval`` seconds (its :class:`~amqprpc.ops.registry.Presence` middleware);
    ``middleware`` hooks around its lifecycle and every delivery (:mod:`amqprpc.middleware`),
    after the process's defaults. Every worker also runs :class:`~amqprpc.middleware.ping.Ping` (the
    built-in ``ping`` action) and :class:`~amqprpc.middleware.shared_client.SharedClient` (its
    handlers' ``service.client``), first; then :class:`~amqprpc.middleware.revoke.RevokeChecks`
    and :class:`~amqprpc.middleware.idempotency.Idempotency`, which keep their state in the
    Redis at ``redis_url`` (default ``AMQPRPC_REDIS_URL``; without it messages run as if
    nothing was revoked or repeated).

    One lifecycle: :meth:`start`, then :meth:`shutdown` (warm) or :meth:`stop` (cold). Its
    connection is an :class:`~amqprpc.transport.ioloop.AmqpLoop` it holds, not one it is.
    """

    def __init__(self, service: Service, *, broker_url: str | None = None, concurrency: int = 8,
                 prefetch: int | None = None, topology: Topology = DEFAULT_TOPOLOGY,
                 heartbeat: float = 30.0, max_message_bytes: int = 1 << 20, queue_type: str = "classic",
                 max_redeliveries: int = 5, registry: Any = None,
                 registry_interval: float = 5.0, max_reply_bytes: int = 16 << 20,
                 middleware: Sequence[Middleware] | None = None, reconnect_cap: float = 10.0,
                 redis_url: str | None = None):
        # Handler annotations that cannot be validated with stop the worker here, before it
        # connects (ContractError; `amqprpc worker` exits 2), not on the first call.
        service.check()
        self.service = service
        self.concurrency = concurrency
        self.prefetch = prefetch or concurrency * 2
        self.topology = topology
        self.max_message_bytes = max_message_bytes
        self.max_reply_bytes = max_reply_bytes
        self.queue_name = topology.request_queue_format.format(service=service.name)
        self.queue_type = queue_type
        self.redelivery = Redelivery(service.name, topology, queue_type, max_redeliveries)
        self.instance_id = new_instance_id()
        self.consumer_tag = f"amqprpc.{service.name}.{self.instance_id}"
        # The broker's own delivery limit sits above ours: the worker sees a poison message's
        # last delivery itself and dead-letters it with the reason (the broker's dead-letter
        # route on quorum queues is only the backstop). Set explicitly, so RabbitMQ 4's
        # default of 20 never undercuts a larger --max-redeliveries.
        self.delivery_limit = max_redeliveries + 2
        self.event_consumers = events.event_consumers(service, topology, self.consumer_tag, queue_type,
                                                      self.delivery_limit, self.instance_id)
        self._consumer = Consumer(default_broker_url(broker_url), name=f"amqprpc-io-{service.name}",
                                  prefetch=self.prefetch, redelivery=self.redelivery, declare=self._declare,
                                  heartbeat=heartbeat, reconnect_cap=reconnect_cap)
        self._loop = self._consumer.loop
        self.url = self._loop.url
        self.forwarder = self._consumer.forwarder
        # Handler threads reply and ack under the loop's write lock themselves (see _finish_here).
        self._write_lock = self._loop.write_lock
        self._inbox = self._consumer.inbox
        self._threads: list[threading.Thread] = []
        self._counts = {"succeeded": 0, "failed": 0, "refused": 0, "expired": 0, "retried": 0, "dead_lettered": 0,
                        "recounted": 0, "revoked": 0, "deduplicated": 0}
        self._counts_lock = threading.Lock()  # handler threads count outcomes
        # Handler thread ident -> the (generation, message) it runs: whoever pops it settles
        # that delivery (the thread itself, or write_off giving up on a stuck one).
        self._running: dict[int, tuple[int, amqp.Message]] = {}
        # While it is quiet an idle handler thread reads the socket itself and runs what it
        # reads (leader/follower: Consumer.next_delivery); lends, leads: self.read_token.
        self.read_token = self._consumer.lend_to_threads(self._running.__len__)
        self.started_at = time.time()
        # Actions every worker answers besides its service's own (which win): registered by
        # middleware as the worker starts (ping).
        self.builtins: dict[str, Handler] = {}
        given = [*(middleware or ()), *([registry.presence(registry_interval)] if registry is not None else ())]
        if service.uses_time_limits and not any(isinstance(each, TimeLimit) for each in given):
            given.append(TimeLimit())  # the handlers' time_limit= (amqprpc worker passes its own)
        # OpenTelemetry (when the application configured an SDK) first: the trace is current
        # for every other middleware's hooks too.
        self.hooks = Hooks(given, builtin=(*automatic(given), Ping(), SharedClient(), *tasks_in_time(service),
                                           RevokeChecks(RevocationStore(redis_url)),
                                           Idempotency(IdempotencyStore(redis_url)), Workflows()))
        self.dispatcher = self._dispatcher()

    def _dispatcher(self) -> Dispatcher:
        """What decides each delivery, with this worker's middleware composed into it."""
        return Dispatcher(self.service, queue_name=self.queue_name, redelivery=self.redelivery, hooks=self.hooks,
                          event_consumers=self.event_consumers, builtins=self.builtins,
                          max_message_bytes=self.max_message_bytes, max_reply_bytes=self.max_reply_bytes, owner=self)

    # --- lifecycle (any thread) --------------------------------------------------------
    @property
    def name(self) -> str:
        return self.service.name

    @property
    def alive(self) -> bool:
        """Whether its connection's thread runs (it reconnects by itself; False once stopped)."""
        return self._loop.alive

    @property
    def channel(self) -> amqp.Channel | None:
        """The channel it consumes on (None while reconnecting)."""
        return self._consumer.channel

    @property
    def stats(self) -> dict[str, int]:
        """What it did so far: received, and the counts of the outcomes (succeeded: replied
        or done; failed: any other end of a handler run or request, retried and
        dead_lettered included; refused; expired; recounted; revoked: acked unrun or stopped
        after a revoke; deduplicated: a repeated idempotency key, answered from the first run;
        channels_lost: consuming channels the broker closed, e.g. for a handler past its
        consumer_timeout)."""
        with self._counts_lock:
            return {"received": self._consumer.received, "channels_lost": self._consumer.channel_losses, **self._counts}

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the counter ``name`` of :attr:`stats` (for middleware: workflows
        ended, ...)."""
        with self._counts_lock:
            self._counts[name] = self._counts.get(name, 0) + n

    def start(self, *, broker_wait: float = 0.0,
              on_connect_retry: Callable[[int, float, BaseException], None] | None = None) -> None:
        """Connect, start consuming and start the handler threads. When it raises, no
        thread of this worker is left running.

        ``broker_wait`` seconds (``math.inf``: for ever) a broker that does not answer yet is
        retried, with backoff, each attempt passed to ``on_connect_retry(attempt, retry_in,
        exc)``, until it answers or :meth:`cancel_start` gives up (then this raises
        :class:`~amqprpc.transport.ioloop.StartCancelled`)."""
        hooks = self.hooks
        hooks.run(hooks.worker_starting, self)
        self.dispatcher = self._dispatcher()  # with what was added since it was made (hooks.add)
        for index in range(self.concurrency):
            thread = threading.Thread(target=self._work, name=f"amqprpc-handler-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)
        try:
            self._consumer.start(broker_wait, on_connect_retry)
        except BaseException:
            self._end_threads(5.0)
            hooks.run(hooks.worker_stopped, self)
            raise
        log.info("worker ready", queue=self.queue_name, concurrency=self.concurrency, prefetch=self.prefetch,
                 event_queues=[consumer.queue.name for consumer in self.event_consumers.values()])
        hooks.run(hooks.worker_started, self)

    def _end_threads(self, timeout: float) -> bool:
        """Let each handler thread finish what it runs and end; True when all did within ``timeout``."""
        for _ in self._threads:
            self._inbox.put(STOP)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        finished = not any(thread.is_alive() for thread in self._threads)
        self._threads = [thread for thread in self._threads if thread.is_alive()]
        return finished

    def cancel_start(self) -> None:
        """Stop waiting for the broker at start (see :meth:`start`); safe from a signal handler."""
        self._loop.cancel_start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Cold stop: close the connection now (the broker requeues every unacked message);
        handler threads still running are abandoned (they are daemons)."""
        self._loop.stop(timeout)

    def shutdown(self, timeout: float = 30.0) -> bool:
        """Warm stop: stop consuming, requeue what was prefetched but not started, let
        running handlers finish within ``timeout`` seconds, publish their replies and acks,
        then close. Returns False when handlers were still running at the timeout (their
        messages go back to the queue when the connection closes)."""
        hooks = self.hooks
        hooks.run(hooks.worker_stopping, self)
        stopped = threading.Event()
        # After CancelOk nothing more arrives: what no handler has taken goes back to the queue.
        self._loop.call_soon(self._consumer.stop_consuming, stopped, True)
        stopped.wait(5.0)
        deadline = time.monotonic() + timeout
        finished = self._end_threads(timeout)
        # Retries and dead letters already handed to the loop: let their confirms (and so
        # the originals' acks) arrive, or the originals come back as duplicates.
        self._consumer.flush(deadline - time.monotonic())
        self._loop.stop()
        # Not clean = handlers were cut off at the timeout and their messages requeued: an operator should see it.
        token = self.read_token
        (log.info if finished else log.warning)("worker stopped", clean=finished, **self.stats,
                                                forwarded=dict(self.forwarder.stats), lent=token.lends, led=token.leads)
        hooks.run(hooks.worker_stopped, self)
        return finished

    # --- loop thread -------------------------------------------------------------------
    def _declare(self, connection: Any, channel: amqp.Channel) -> tuple[amqp.Channel, dict[str, Any]]:
        """Its request queue and its event handlers' queues, by consumer tag (loop thread)."""
        queues = {}
        try:
            channel, queues[self.consumer_tag] = declare_queue(
                connection, channel, self.topology.request_queue(self.service.name, self.queue_type,
                                                                 self.delivery_limit, self.service.max_priority))
            for tag, consumer in self.event_consumers.items():
                channel, queues[tag] = declare_queue(connection, channel, consumer.queue)
        except amqp.exceptions.PreconditionFailed as exc:
            if "x-max-priority" in (exc.reply_text or ""):
                raise TopologyMismatch(priority_mismatch(self.service.name, self.service.max_priority,
                                                         exc.reply_text)) from None
            raise TopologyMismatch(
                f"a queue of {self.service.name} exists with other arguments than --queue-type {self.queue_type} "
                f"--max-redeliveries {self.redelivery.max_redeliveries} declare ({exc.reply_text}); run with its "
                "current settings, or drain and delete it first") from None
        return channel, queues

    def _finish(self, generation: int, message: amqp.Message, decision: Decision) -> None:
        """Publish the reply (if any), then settle the delivery: ack it, or publish the
        decision's Forward (retry, dead letter, recount) and ack once that is confirmed."""
        channel = self._consumer.channel
        if channel is None:
            return
        if decision.body is not None and decision.reply_to:
            # Persistent: a reply waiting in the durable collector queue (submit) must survive a
            # broker restart; in a caller's transient reply queue the flag costs nothing.
            try:
                publish(channel, amqp.Message(decision.body, content_type=envelope.CONTENT_TYPE,
                                              correlation_id=decision.correlation_id, delivery_mode=2),
                        "", decision.reply_to)
            except UNENCODABLE as exc:
                # Never sendable, however often the request came back: dead-letter it (on
                # the loop thread, the forwarder's) instead of leaving it unacked. (The
                # decoder refuses reply fields that cannot travel back; this is the backstop.)
                log.error("reply cannot be encoded; request dead-lettered", error=repr(exc)[:500])
                self._amend(decision, "UnsendableReply")
                self._loop.call_soon(self._finish, generation, message, Decision(forward=self.redelivery.dead_letter(
                    message, decision.delivery.queue if decision.delivery else self.queue_name,
                    f"Reply could not be sent: {exc!r}", "UnsendableReply"),
                    outcome=decision.outcome, delivery=decision.delivery))
                return
        if decision.discard:
            if generation == self._loop.generation:
                channel.basic_reject(message.delivery_tag, requeue=False)
            return
        forward = decision.forward
        # A copy that cannot be encoded goes as a bare dead letter ("UnencodableCopy"): amended.
        self._consumer.settle(channel, generation, message, forward,
                              None if forward is None else lambda: self._amend(decision, "UnencodableCopy"))

    def _amend(self, decision: Decision, error_type: str) -> None:
        """What was decided (and accounted for, and told to ``after_handle``) could not be
        carried out: the delivery was dead-lettered instead, for ``error_type``. The stats
        move it to what became of it; middleware hears it through ``outcome_amended``
        (any thread: the loop's or a handler's)."""
        old = decision.outcome
        new = decision.outcome = Outcome(OutcomeKind.DEAD_LETTERED, error_type, old.duration, True)
        if old is not UNSET:
            with self._counts_lock:
                counts = self._counts
                for key in _stats_of(old.kind):
                    counts[key] -= 1
                for key in _stats_of(new.kind):
                    counts[key] = counts.get(key, 0) + 1
        hooks = self.hooks
        if hooks.outcome_amended and decision.delivery is not None:
            hooks.run(hooks.outcome_amended, decision.delivery, old, new)

    # --- handler threads ---------------------------------------------------------------
    def _work(self) -> None:
        get = self._consumer.next_delivery  # (the inbox's, or read from the socket by this thread)
        running, ident = self._running, threading.get_ident()
        while True:
            item = get()
            if item is STOP:
                return
            generation, message = item
            running[ident] = item
            decision = self._process(message)
            if running.pop(ident, None) is None:  # written off meanwhile: settled without us, replaced
                log.warning("abandoned handler thread returned late; its decision dropped", thread=ident)
                return
            self._finish_here(generation, message, decision)

    def write_off(self, ident: int, reason: str, error_type: str) -> bool:
        """Give up on handler thread ``ident``, stuck in a handler that will not return (one
        that ignored its time limit, :mod:`amqprpc.middleware.timelimit`): its delivery is
        dead-lettered with ``reason`` now, whatever it decides should it ever return is
        dropped, and a new handler thread takes its place (a warm stop does not wait for the
        stuck one). False when it had already finished (it settles its delivery itself)."""
        item = self._running.pop(ident, None)
        if item is None:
            return False
        generation, message = item
        replacement = threading.Thread(target=self._work, name=f"amqprpc-handler-r{ident}", daemon=True)
        self._threads = [*(thread for thread in self._threads if thread.ident != ident), replacement]
        replacement.start()
        consumer = self.event_consumers.get(message.delivery_info.get("consumer_tag"))
        queue = self.queue_name if consumer is None else consumer.queue.name
        decision = Decision(forward=self.redelivery.dead_letter(message, queue, reason, error_type),
                            outcome=Outcome(OutcomeKind.DEAD_LETTERED, error_type, 0.0, True))
        self._account(decision.outcome)
        self._loop.call_soon(self._finish, generation, message, decision)
        return True

    def _process(self, message: amqp.Message) -> Decision:
        """Decide what becomes of one delivery (the dispatcher, with the middleware around
        it); account for its outcome (stats, metrics, logs: all read this one Outcome)."""
        decision = self.dispatcher.dispatch(message)
        self._account(decision.outcome)
        return decision

    def _account(self, outcome: Outcome) -> None:
        with self._counts_lock:
            counts = self._counts
            for key in _stats_of(outcome.kind):
                counts[key] = counts.get(key, 0) + 1

    def _finish_here(self, generation: int, message: amqp.Message, decision: Decision) -> None:
        """Reply and ack from this handler thread, without a hop to the loop thread and
        back (frames are serialized by ``write_lock``, see AmqpLoop._lock_frames). While
        reconnecting there is no channel, and a Forward (retry, dead letter) is the
        forwarder's, which lives on the loop thread: those go through the loop."""
        # Never wait for the lock: when another thread is writing, the loop thread takes
        # this one over (it writes what piled up in one go) instead of handler threads
        # queueing on the lock, each sleep and wake-up a context switch.
        if decision.forward is None and self._write_lock.acquire(blocking=False):
            try:
                if self._consumer.channel is not None:
                    try:
                        corked = self._loop.cork()  # the reply and the ack in one write
                        try:
                            self._finish(generation, message, decision)
                        finally:
                            self._loop.uncork(corked)
                    except Exception as exc:  # noqa: BLE001 - dead connection: the loop reconnects, broker redelivers
                        log.warning("reply or ack not sent", error=repr(exc))
                    return
            finally:
                self._write_lock.release()
        self._loop.call_soon(self._finish, generation, message, decision)
