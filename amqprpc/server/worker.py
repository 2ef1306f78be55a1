"""A worker: consumes one service's request queue and runs its handlers in a thread pool.

Threads, and why:
- the loop thread (:class:`~amqprpc.transport.ioloop.AmqpLoop`, held by the worker's
  :class:`~amqprpc.transport.consumer.Consumer`) owns the connection: it receives deliveries and keeps
  heartbeats flowing however long handlers run.
- ``concurrency`` handler threads take deliveries from an in-process queue, decode, run
  the handler, then publish the reply and ack themselves under the loop's ``write_lock``
  (or, when it is taken, hand ``(reply, ack)`` back to the loop with ``call_soon``).

A message is acked only after its reply was published (at-least-once). The prefetch
bounds how many messages one worker holds unacked (per consumed queue).

Events (``@service.event``) are consumed on the same channel, one consumer per handler
(:mod:`amqprpc.server.events`), run by the same handler threads and acked once the handler returned.

Each delivery gets one :class:`Decision` (reply, forward, ack) with one
:class:`~amqprpc.outcome.Outcome`, decided in :meth:`Worker._process`: the stats and every
middleware (:mod:`amqprpc.middleware`: metrics among them) read that outcome.
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Callable, Sequence

import amqp

from amqprpc import context, logs
from amqprpc.wire import envelope
from amqprpc.server import events
from amqprpc.config import broker_url as default_broker_url
from amqprpc.transport.consumer import STOP, Consumer
from amqprpc.errors import BadMessage, ReplyTooLarge, ValidationError  # ReplyTooLarge re-exported: its home was here
from amqprpc.transport.framehandler import UndecodableMessage
from amqprpc.wire.ids import new_instance_id
from amqprpc.transport.ioloop import UNENCODABLE, publish
from amqprpc.middleware import Delivery, Hooks, Middleware
from amqprpc.middleware.observability import automatic
from amqprpc.outcome import Outcome, OutcomeKind
from amqprpc.middleware.ping import Ping
from amqprpc.transport.redelivery import UNDECODABLE, Forward, Redelivery
from amqprpc.retry import ERROR, ERROR_TYPE, Retry, attempts_made
from amqprpc.service import EventSubscription, Handler, Service, snake_case
from amqprpc.middleware.shared_client import SharedClient
from amqprpc.wire.topology import DEFAULT_TOPOLOGY, Topology, TopologyMismatch, declare_queue, priority_mismatch

log = logs.get_logger("amqprpc.worker")


# The worker's counters each outcome adds to ("failed": every handler run or request that
# did not succeed, whatever then became of it).
_STATS_OF = {
    OutcomeKind.REPLIED: ("succeeded",), OutcomeKind.DONE: ("succeeded",), OutcomeKind.FAILED: ("failed",),
    OutcomeKind.RETRIED: ("failed", "retried"), OutcomeKind.DEAD_LETTERED: ("failed", "dead_lettered"),
    OutcomeKind.REFUSED: ("refused",), OutcomeKind.EXPIRED: ("expired",), OutcomeKind.RECOUNTED: ("recounted",),
}


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
    handlers' ``service.client``), first.

    One lifecycle: :meth:`start`, then :meth:`shutdown` (warm) or :meth:`stop` (cold). Its
    connection is an :class:`~amqprpc.transport.ioloop.AmqpLoop` it holds, not one it is.
    """

    def __init__(self, service: Service, *, broker_url: str | None = None, concurrency: int = 8,
                 prefetch: int | None = None, topology: Topology = DEFAULT_TOPOLOGY,
                 heartbeat: float = 30.0, max_message_bytes: int = 1 << 20, queue_type: str = "classic",
                 max_redeliveries: int = 5, registry: Any = None,
                 registry_interval: float = 5.0, max_reply_bytes: int = 16 << 20,
                 middleware: Sequence[Middleware] | None = None, reconnect_cap: float = 10.0):
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
                        "recounted": 0}
        self._counts_lock = threading.Lock()  # handler threads count outcomes
        self.started_at = time.time()
        # Actions every worker answers besides its service's own (which win): registered by
        # middleware as the worker starts (ping).
        self.builtins: dict[str, Handler] = {}
        given = [*(middleware or ()), *([registry.presence(registry_interval)] if registry is not None else ())]
        # OpenTelemetry (when the application configured an SDK) first: the trace is current
        # for every other middleware's hooks too.
        self.hooks = Hooks(given, builtin=(*automatic(given), Ping(), SharedClient()))

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
        dead_lettered included; refused; expired; recounted)."""
        with self._counts_lock:
            return {"received": self._consumer.received, **self._counts}

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
        (log.info if finished else log.warning)("worker stopped", clean=finished, **self.stats,
                                                forwarded=dict(self.forwarder.stats))
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
                    message, self._queue_of(message), f"Reply could not be sent: {exc!r}", "UnsendableReply"),
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
        if old is not _UNSET:
            with self._counts_lock:
                counts = self._counts
                for key in _STATS_OF[old.kind]:
                    counts[key] -= 1
                for key in _STATS_OF[new.kind]:
                    counts[key] += 1
        hooks = self.hooks
        if hooks.outcome_amended and decision.delivery is not None:
            hooks.run(hooks.outcome_amended, decision.delivery, old, new)

    # --- handler threads ---------------------------------------------------------------
    def _work(self) -> None:
        get = self._inbox.get
        while True:
            item = get()
            if item is STOP:
                return
            generation, message = item
            self._finish_here(generation, message, self._process(message))

    def _process(self, message: amqp.Message) -> Decision:
        """Decide what becomes of one delivery, with the middleware around it; account
        for its outcome (stats, metrics, logs: all read this one Outcome)."""
        started = time.perf_counter()
        consumer = self.event_consumers.get(message.delivery_info.get("consumer_tag")) if self.event_consumers else None
        queue_name = self.queue_name if consumer is None else consumer.queue.name
        hooks = self.hooks
        # What the middleware sees; not even built when no middleware looks at deliveries.
        delivery = None
        if hooks.before_handle or hooks.after_handle or hooks.outcome_amended:
            properties = message.properties
            delivery = Delivery(self.service.name,
                                "event" if consumer else "call" if properties.get("reply_to") else "cast",
                                queue_name, properties, message.delivery_info, len(message.body or b""), started)
        decision: Decision | None
        try:
            decision, request = self._screen(message, queue_name, consumer, started)
        except Exception as exc:  # noqa: BLE001 - a bug here must not kill the handler thread
            decision, request = self._crashed(message, exc, started), None
        if delivery is not None:  # before_handle and after_handle: once each, whatever happens
            if request is not None:
                _describe(delivery, request, consumer)
            if hooks.before_handle:
                hooks.run(hooks.before_handle, delivery)
        if decision is None:
            assert request is not None  # _screen decoded it
            try:
                if consumer is not None:
                    decision = self._handle_event(consumer.subscription, message, request, started, delivery)
                else:
                    decision = self._handle(message, request, started, delivery)
            except Exception as exc:  # noqa: BLE001 - a bug here must not kill the handler thread
                decision = self._crashed(message, exc, started)
        self._account(decision.outcome)
        if delivery is not None:
            decision.delivery = delivery  # for outcome_amended, should the decision fail to be carried out
            if hooks.after_handle:
                hooks.run(hooks.after_handle, delivery, decision.outcome)
        return decision

    def _account(self, outcome: Outcome) -> None:
        with self._counts_lock:
            counts = self._counts
            for key in _STATS_OF[outcome.kind]:
                counts[key] += 1

    def _crashed(self, message: amqp.Message, exc: Exception, started: float) -> Decision:
        """A message the worker itself failed on: dead-lettered (without its headers if
        they are what fails); rejected without requeue when even that fails (the broker
        dead-letters it from a quorum queue, drops it from a classic one)."""
        log.exception("worker failed to process a message")
        for keep_headers in (True, False):  # the headers from the wire may be what failed
            try:
                return Decision(forward=self.redelivery.dead_letter(message, self._queue_of(message), repr(exc),
                                                                    "WorkerError", keep_headers=keep_headers),
                                outcome=_outcome(OutcomeKind.DEAD_LETTERED, "WorkerError", started, True))
            except Exception:  # noqa: BLE001 - never let one message end the handler thread
                log.exception("message cannot be dead-lettered", with_headers=keep_headers)
        return Decision(discard=True, outcome=_outcome(OutcomeKind.DEAD_LETTERED, "WorkerError", started))

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

    def _screen(self, message: amqp.Message, queue_name: str, consumer: events.EventConsumer | None,
                started: float) -> tuple[Decision | None, envelope.Request | None]:
        """Before any handler runs: a Decision for what is not to run (undecodable, poison,
        not a valid request); else the decoded request."""
        if isinstance(message, UndecodableMessage):
            return self._undecodable(message, queue_name, started), None
        poisoned = self.redelivery.poisoned(message, queue_name)
        if poisoned is not None:
            dead = poisoned.kind is OutcomeKind.DEAD_LETTERED
            if dead:
                log.error("message redelivered too often, dead-lettered unrun", queue=queue_name,
                          correlation_id=message.properties.get("correlation_id"))
            return Decision(forward=poisoned, outcome=_outcome(poisoned.kind, "TooManyRedeliveries" if dead else None,
                                                               started, dead)), None
        try:
            request = envelope.decode_request(message.body, message.properties, self.max_message_bytes)
        except BadMessage as exc:
            if consumer is not None:
                log.warning("bad event message", reason=exc.reason, handler=consumer.subscription.name)
                return Decision(forward=self.redelivery.dead_letter(message, queue_name, exc.reason, "BadMessage"),
                                outcome=_outcome(OutcomeKind.REFUSED, "BadMessage", started, True)), None
            return self._refuse(message, exc.reason, started), None
        return None, request

    def _handle(self, message: amqp.Message, request: envelope.Request, started: float,
                delivery: Delivery | None) -> Decision:
        """Run one request: its reply (or error reply), or where it goes instead."""
        properties = message.properties
        # The envelope's, or what a middleware made it (OpenTelemetry: its trace id).
        trace_id = (delivery.trace_id if delivery is not None else None) or request.trace_id or request.correlation_id
        # Bound before anything is logged, so that even the "expired" and "unknown action"
        # lines carry the request's fields (and nothing of the previous request leaks in).
        logs.clear_request()
        logs.bind_request(service=self.service.name, action=request.action, correlation_id=request.correlation_id,
                          trace_id=trace_id, parent_id=request.headers.get("parent_id"))
        deadline = request.deadline
        if deadline is not None and time.time() > deadline:
            log.info("request expired, dropped unrun", action=request.action, correlation_id=request.correlation_id,
                     trace_id=trace_id, late_by=round(time.time() - deadline, 3))
            headers = properties.get("application_headers") or {}
            if attempts_made(headers) and request.reply_to:  # a retry came back too late: say why it failed
                error_type = str(headers.get(ERROR_TYPE))
                return Decision(request.reply_to, request.correlation_id, envelope.error_reply(
                    str(headers.get(ERROR)), error_type, request.message_id),
                    outcome=_outcome(OutcomeKind.EXPIRED, error_type, started))
            return Decision(outcome=_outcome(OutcomeKind.EXPIRED, None, started))
        handler = self.service.find(request.action)
        builtin = handler is None
        if builtin:
            handler = self.builtins.get(request.action)
        if handler is None:
            if not request.reply_to:  # a cast: nobody hears the error, so say where the message went
                log.warning("unknown action, dead-lettered", action=request.action,
                            correlation_id=request.correlation_id, trace_id=trace_id,
                            dead_letter_queue=self.topology.dead_queue_name(self.service.name))
                return Decision(forward=self.redelivery.dead_letter(
                    message, self.queue_name, f"Unknown action: {request.action}", "UnknownAction"),
                    outcome=_outcome(OutcomeKind.DEAD_LETTERED, "UnknownAction", started, True))
            log.warning("unknown action", action=request.action, correlation_id=request.correlation_id,
                        trace_id=trace_id)
            return Decision(request.reply_to, request.correlation_id, envelope.error_reply(
                f"Unknown action: {request.action}", "UnknownAction", request.message_id),
                outcome=_outcome(OutcomeKind.FAILED, "UnknownAction", started))
        if delivery is not None:  # the registered name: getUser runs get_user
            action = request.action
            delivery.handler = action if builtin or action in self.service.handlers else snake_case(action)
        with self._bound(request.action, request.correlation_id, trace_id, deadline):
            try:
                result = handler(request.payload)
            except Exception as exc:  # noqa: BLE001 - every handler error becomes an error reply
                body = self._failed(exc, request, started)
                forward = self._after_failure(message, request, exc, started)
                if forward is not None:
                    return Decision(forward=forward, outcome=_forwarded(forward, type(exc).__name__, started))
                return Decision(request.reply_to, request.correlation_id, body,
                                outcome=_outcome(OutcomeKind.FAILED, type(exc).__name__, started))
            try:
                body = envelope.ok_reply(result, request.message_id)
            except (TypeError, ValueError) as exc:
                failure: Exception = TypeError(f"Result is not JSON serializable: {exc}")
            else:
                if len(body) <= self.max_reply_bytes:
                    duration = time.perf_counter() - started
                    log.debug("request handled", duration=round(duration, 6))
                    return Decision(request.reply_to, request.correlation_id, body, outcome=Outcome(
                        OutcomeKind.REPLIED if request.reply_to else OutcomeKind.DONE, None, duration))
                failure = ReplyTooLarge(f"Result is {len(body)} bytes of JSON; replies are limited "
                                        f"to {self.max_reply_bytes}")
            body = self._failed(failure, request, started)
        return Decision(request.reply_to, request.correlation_id, body,
                        outcome=_outcome(OutcomeKind.FAILED, type(failure).__name__, started))

    @contextlib.contextmanager
    def _bound(self, action: str, correlation_id: str, trace_id: str, deadline: float | None, **log_fields: Any):
        """Around running one handler (request or event): the call context that nested
        calls and events inherit (trace id, deadline) and the fields of its log lines."""
        token = context.current.set(context.CallContext(self.service.name, action, correlation_id, trace_id, deadline))
        logs.bind_request(service=self.service.name, action=action, correlation_id=correlation_id, trace_id=trace_id,
                          **log_fields)
        try:
            yield
        finally:
            context.current.reset(token)
            logs.clear_request()

    def _handle_event(self, subscription: EventSubscription, message: amqp.Message, event: envelope.Request,
                      started: float, delivery: Delivery | None) -> Decision:
        """Run one event handler: ack once it returned, else what :meth:`_event_failed`
        decides. Events get no reply and have no deadline."""
        trace_id = (delivery.trace_id if delivery is not None else None) or event.trace_id or event.message_id
        with self._bound(event.action, event.message_id, trace_id, None,
                         handler=subscription.name, parent_id=event.headers.get("parent_id")):
            try:
                subscription.function(event.payload)
            except Exception as exc:  # noqa: BLE001 - a failing handler must not kill the thread
                forward = self._event_failed(message, exc, subscription.retry, started)
                return Decision(forward=forward, outcome=_forwarded(forward, type(exc).__name__, started))
            duration = time.perf_counter() - started
            log.debug("event handled", duration=round(duration, 6))
        return Decision(outcome=Outcome(OutcomeKind.DONE, None, duration))

    def _event_failed(self, message: amqp.Message, exc: Exception, policy: Retry | None, started: float) -> Forward:
        """Where a failed event handler's message goes: the one place for retry and
        dead-letter policies. A retry through a delay queue back into this handler's own
        queue while ``policy`` allows, else a dead letter: never a hot requeue
        loop, never dropped. Runs inside the event's log context (trace id bound)."""
        log.warning("event handler failed", error=str(exc), error_type=type(exc).__name__,
                    duration=round(time.perf_counter() - started, 6))
        queue_name = self._queue_of(message)
        forward = self.redelivery.retry_later(message, queue_name, exc, policy)
        if forward is not None:
            log.info("retry scheduled", attempt=forward.message.properties["application_headers"]["x-attempts"],
                     delay_queue=forward.routing_key)
            return forward
        return self.redelivery.dead_letter(message, queue_name, str(exc) or type(exc).__name__, type(exc).__name__)

    def _queue_of(self, message: amqp.Message) -> str:
        """The queue a delivery came from (the request queue or one event handler's)."""
        consumer = self.event_consumers.get(message.delivery_info.get("consumer_tag"))
        return self.queue_name if consumer is None else consumer.queue.name

    def _failed(self, exc: BaseException, request: envelope.Request, started: float) -> bytes:
        error_type = type(exc).__name__
        log.warning("handler failed", error=str(exc), error_type=error_type,
                    duration=round(time.perf_counter() - started, 6))
        # A ValidationError's failing fields travel too ("errors"), for callers in any language.
        return envelope.error_reply(str(exc), error_type, request.message_id,
                                    exc.errors if isinstance(exc, ValidationError) else None)

    def _after_failure(self, message: amqp.Message, request: envelope.Request, exc: Exception,
                       started: float) -> Forward | None:
        """A retry through a delay queue while the policy and deadline allow; a dead
        letter when the failure is final and nobody waits for a reply; else None (the
        caller gets the error reply)."""
        forward = self.redelivery.retry_later(message, self.queue_name, exc, self.service.retry_policy(request.action),
                                              request.deadline, time.perf_counter() - started)
        if forward is not None:
            log.info("retry scheduled", attempt=forward.message.properties["application_headers"]["x-attempts"],
                     delay_queue=forward.routing_key)
            return forward
        if request.reply_to:
            return None
        return self.redelivery.dead_letter(message, self.queue_name, str(exc) or type(exc).__name__,
                                           type(exc).__name__)

    def _refuse(self, message: amqp.Message, reason: str, started: float) -> Decision:
        """A message that is not a valid request: answer it if it names a reply queue,
        otherwise dead-letter it with the reason (never a requeue loop)."""
        body = message.body
        reply_to, correlation_id = (None, None)
        if len(body) <= self.max_message_bytes:
            reply_to, correlation_id = envelope.reply_address(message.properties, body)
        else:
            reply_to, correlation_id = message.properties.get("reply_to"), message.properties.get("correlation_id")
        log.warning("bad message", reason=reason, correlation_id=correlation_id[:255] if correlation_id else None,
                    answered=bool(reply_to))
        if reply_to:
            # A correlation id too long for the property still goes back in the body, where
            # a client that matches replies by message_id finds it.
            sendable = None if correlation_id and envelope.shortstr_problem("", correlation_id) else correlation_id
            return Decision(reply_to, sendable, envelope.error_reply(reason, "BadMessage", correlation_id),
                            outcome=_outcome(OutcomeKind.REFUSED, "BadMessage", started))
        return Decision(forward=self.redelivery.dead_letter(message, self.queue_name, reason, "BadMessage"),
                        outcome=_outcome(OutcomeKind.REFUSED, "BadMessage", started, True))

    def _undecodable(self, message: UndecodableMessage, queue_name: str, started: float) -> Decision:
        """A delivery whose properties (or routing key) did not decode: dead-lettered unrun
        with its raw bytes. If its reply address (reply_to and correlation_id) did decode,
        the caller also gets an error reply, rather than wait for its timeout."""
        properties = message.properties
        reply_to, correlation_id = properties.get("reply_to"), properties.get("correlation_id")
        log.warning("undecodable message dead-lettered", problem=message.problem, queue=queue_name,
                    correlation_id=correlation_id, answered=bool(reply_to))
        forward = self.redelivery.undecodable(message, queue_name)
        outcome = _outcome(OutcomeKind.REFUSED, UNDECODABLE, started, True)
        if not (reply_to and correlation_id) or queue_name != self.queue_name:  # events get no replies
            return Decision(forward=forward, outcome=outcome)
        reason = f"Undecodable message: {message.problem}"
        return Decision(reply_to, correlation_id, envelope.error_reply(reason, "BadMessage", correlation_id), forward,
                        outcome=outcome)


_UNSET = Outcome(OutcomeKind.FAILED)  # of a decision made after the outcome was accounted for


class Decision:
    """What a handler thread decided for one delivery: the reply to publish (``body`` to
    ``reply_to``, if any), then ``forward`` it (retry, dead letter, recount: acked once the
    copy is confirmed), or ``discard`` it (reject, no requeue: the last resort when not even
    a dead letter can be built), or else ack it; and the ``outcome`` that is accounted for
    (amended when the reply or the copy cannot be encoded); ``delivery`` the middleware's
    view of it, when middleware looks at deliveries."""

    __slots__ = ("reply_to", "correlation_id", "body", "forward", "discard", "outcome", "delivery")

    def __init__(self, reply_to: str | None = None, correlation_id: str | None = None, body: bytes | None = None,
                 forward: Forward | None = None, *, discard: bool = False, outcome: Outcome = _UNSET,
                 delivery: Delivery | None = None) -> None:
        self.reply_to = reply_to
        self.correlation_id = correlation_id
        self.body = body
        self.forward = forward
        self.discard = discard
        self.outcome = outcome
        self.delivery = delivery


def _describe(delivery: Delivery, request: envelope.Request, consumer: events.EventConsumer | None) -> None:
    """Copy what the envelope says to the middleware's view of the delivery."""
    delivery.action = request.action
    delivery.payload = request.payload
    delivery.body_headers = request.headers
    delivery.message_id = request.message_id
    if consumer is not None:
        delivery.handler = consumer.subscription.name
        delivery.trace_id = request.trace_id or request.message_id
    else:
        delivery.correlation_id = request.correlation_id
        delivery.reply_to = request.reply_to
        delivery.kind = "call" if request.reply_to else "cast"
        delivery.trace_id = request.trace_id or request.correlation_id


def _outcome(kind: OutcomeKind, error_type: str | None, started: float, dead_lettered: bool = False) -> Outcome:
    return Outcome(kind, error_type, time.perf_counter() - started, dead_lettered)


def _forwarded(forward: Forward, error_type: str, started: float) -> Outcome:
    """The outcome of a failed handler's message sent on: retried, or dead-lettered."""
    return _outcome(forward.kind, error_type, started, forward.kind is OutcomeKind.DEAD_LETTERED)
