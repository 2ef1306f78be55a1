"""A worker: consumes one service's request queue and runs its handlers in a thread pool.

Threads, and why:
- the loop thread (:class:`~amqprpc.ioloop.AmqpLoop`) owns the connection: it receives
  deliveries and keeps heartbeats flowing however long handlers run.
- ``concurrency`` handler threads take deliveries from an in-process queue, decode, run
  the handler, then publish the reply and ack themselves under the loop's ``write_lock``
  (or, when it is taken, hand ``(reply, ack)`` back to the loop with ``call_soon``).

A message is acked only after its reply was published (at-least-once). The prefetch
bounds how many messages one worker holds unacked (per consumed queue).

Events (``@service.event``) are consumed on the same channel, one consumer per handler
(:mod:`amqprpc.events`), run by the same handler threads and acked once the handler returned.
"""
from __future__ import annotations

import contextlib
import os
import queue
import socket
import threading
import time
from typing import Any

import amqp

from . import context, envelope, events, logs, shared_client
from .config import broker_url as default_broker_url
from .errors import BadMessage
from .framehandler import UndecodableMessage
from .ioloop import UNENCODABLE, AmqpLoop, publish
from .redelivery import Forward, Forwarder, Redelivery
from .retry import ERROR, ERROR_TYPE, attempts_made
from .registry import DEFAULT_INTERVAL, Presence, Registry, describe_worker, new_instance_id, ping_handler
from .service import EventSubscription, Service
from .topology import DEFAULT_TOPOLOGY, Topology, TopologyMismatch, declare_queue

log = logs.get_logger("amqprpc.worker")

_STOP = object()


class ReplyTooLarge(Exception):
    """A handler's result too large to send back (``Worker.max_reply_bytes``)."""


class Worker(AmqpLoop):
    """Serve ``service`` from its request queue.

    Parameters: ``concurrency`` handler threads; ``prefetch`` unacked messages held at most
    (default twice the concurrency); ``max_message_bytes`` larger bodies are refused;
    ``max_reply_bytes`` larger results are answered with a ``ReplyTooLarge`` error (the
    broker closes the channel on a message above its ``max_message_size``, 16 MiB by
    default in RabbitMQ 4, and the request would come back);
    ``heartbeat`` seconds; ``queue_type`` "classic" or "quorum"; ``max_redeliveries`` a
    message redelivered more often (its handler keeps killing the worker) is dead-lettered unrun;
    ``registry`` a :class:`~amqprpc.registry.Registry` to announce this instance in every
    ``registry_interval`` seconds (from a thread of its own).
    """

    def __init__(self, service: Service, *, broker_url: str | None = None, concurrency: int = 8,
                 prefetch: int | None = None, topology: Topology = DEFAULT_TOPOLOGY,
                 heartbeat: float = 30.0, max_message_bytes: int = 1 << 20, queue_type: str = "classic",
                 max_redeliveries: int = 5, registry: Registry | None = None,
                 registry_interval: float = DEFAULT_INTERVAL, max_reply_bytes: int = 16 << 20):
        super().__init__(default_broker_url(broker_url), name=f"amqprpc-io-{service.name}", heartbeat=heartbeat)
        self.service = service
        self.concurrency = concurrency
        self.prefetch = prefetch or concurrency * 2
        self.topology = topology
        self.max_message_bytes = max_message_bytes
        self.max_reply_bytes = max_reply_bytes
        self.queue_name = topology.request_queue_format.format(service=service.name)
        self.queue_type = queue_type
        self.redelivery = Redelivery(service.name, topology, queue_type, max_redeliveries)
        self.forwarder = Forwarder()
        self.channel: amqp.Channel | None = None
        self.consumer_tag = f"amqprpc.{service.name}.{socket.gethostname()}.{os.getpid()}.{os.urandom(3).hex()}"
        # The broker's own delivery limit sits above ours: the worker sees a poison message's
        # last delivery itself and dead-letters it with the reason (the broker's dead-letter
        # route on quorum queues is only the backstop). Set explicitly, so RabbitMQ 4's
        # default of 20 never undercuts a larger --max-redeliveries.
        self.delivery_limit = max_redeliveries + 2
        self.event_consumers = events.event_consumers(service, topology, self.consumer_tag, queue_type,
                                                      self.delivery_limit)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._consuming = False
        self._shutting_down = False
        self.stats = {"received": 0, "succeeded": 0, "failed": 0, "rejected": 0, "expired": 0}
        self.instance_id = new_instance_id()
        self.started_at = time.time()
        self._builtins = {"ping": ping_handler(self)}
        self.presence = registry and Presence(registry, lambda: describe_worker(self), registry_interval)

    # --- lifecycle (any thread) --------------------------------------------------------
    def start(self) -> None:
        """Connect, start consuming and start the handler threads."""
        for index in range(self.concurrency):
            thread = threading.Thread(target=self._work, name=f"amqprpc-handler-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)
        shared_client.attach(self.service.name, self.url, self.topology)
        try:
            super().start()
        except BaseException:
            shared_client.detach(self.service.name, self.url, self.topology)
            raise
        if self.presence:
            self.presence.start()
        log.info("worker ready", queue=self.queue_name, concurrency=self.concurrency, prefetch=self.prefetch,
                 event_queues=[consumer.queue.name for consumer in self.event_consumers.values()])

    def shutdown(self, timeout: float = 30.0) -> bool:
        """Warm stop: stop consuming, requeue what was prefetched but not started, let
        running handlers finish within ``timeout`` seconds, publish their replies and acks,
        then close. Returns False when handlers were still running at the timeout (their
        messages go back to the queue when the connection closes)."""
        stopped = threading.Event()
        self._shutting_down = True  # a reconnect during the stop must not consume again
        self.call_soon(self._stop_consuming, stopped)
        stopped.wait(5.0)
        if self.presence:
            self.presence.stop()  # stop advertising as soon as we stop consuming
        for _ in self._threads:
            self._inbox.put(_STOP)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        finished = not any(thread.is_alive() for thread in self._threads)
        # Retries and dead letters already handed to the loop: let their confirms (and so
        # the originals' acks) arrive, or the originals come back as duplicates.
        flushed = threading.Event()
        self.call_soon(flushed.set)
        if flushed.wait(5.0):
            self.forwarder.idle.wait(max(1.0, deadline - time.monotonic()))
        shared_client.detach(self.service.name, self.url, self.topology)
        self.stop()
        # Not clean = handlers were cut off at the timeout and their messages requeued: an operator should see it.
        (log.info if finished else log.warning)("worker stopped", clean=finished, **self.stats,
                                                **self.forwarder.stats)
        return finished

    # --- loop thread -------------------------------------------------------------------
    def on_connected(self, connection) -> None:
        channel = connection.channel()
        queues = {}
        try:
            channel, queues[self.consumer_tag] = declare_queue(
                connection, channel, self.topology.request_queue(self.service.name, self.queue_type,
                                                                 self.delivery_limit))
            for tag, consumer in self.event_consumers.items():
                channel, queues[tag] = declare_queue(connection, channel, consumer.queue)
        except amqp.exceptions.PreconditionFailed as exc:
            raise TopologyMismatch(
                f"a queue of {self.service.name} exists with other arguments than --queue-type {self.queue_type} "
                f"--max-redeliveries {self.redelivery.max_redeliveries} declare ({exc.reply_text}); run with its "
                "current settings, or drain and delete it first") from None
        # The dead-letter and delay queues are declared on first use (Forward.declare): a
        # service that never fails leaves nothing behind on the broker.
        self.forwarder.connect(connection)
        channel.basic_qos(0, self.prefetch, False)
        self.channel = channel
        if self._shutting_down:
            return
        for tag, declared in queues.items():
            self.consume(channel, declared, self._on_message, consumer_tag=tag)
        self._consuming = True

    def keep_consuming(self, consumer_tag: str) -> bool:
        return self._consuming and not self._shutting_down

    def on_disconnected(self, exc) -> None:
        # Unacked deliveries of the dead channel are redelivered by the broker; replies of
        # handlers still running are published on the next connection, their acks dropped.
        with self.write_lock:
            self.channel = None
        self.forwarder.disconnected()
        # What no handler has taken yet is back in the queue already: running it now would
        # only make a duplicate whose ack is dropped.
        dropped = len(self._take_unstarted())
        if dropped:
            log.info("dropped unstarted messages of the lost connection", count=dropped)

    def _take_unstarted(self) -> list:
        """Empty the inbox of the deliveries no handler has taken; shutdown's sentinels stay."""
        taken, sentinels = [], 0
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                sentinels += 1
            else:
                taken.append(item)
        for _ in range(sentinels):  # still owed to the handler threads
            self._inbox.put(_STOP)
        return taken

    def _on_message(self, message: amqp.Message) -> None:
        self.stats["received"] += 1
        self._inbox.put((self.generation, message))

    def _stop_consuming(self, done: threading.Event) -> None:
        try:
            if self.channel is not None and self._consuming:
                self._consuming = False
                self.channel.basic_cancel(self.consumer_tag)
                for tag in self.event_consumers:
                    self.channel.basic_cancel(tag)
            # After CancelOk nothing more arrives: give back what no handler has taken.
            requeued = 0
            for generation, message in self._take_unstarted():
                if generation == self.generation and self.channel is not None:
                    self.channel.basic_reject(message.delivery_tag, requeue=True)
                    requeued += 1
            if requeued:
                log.info("requeued prefetched messages", count=requeued)
        finally:
            done.set()

    def _finish(self, generation: int, message: amqp.Message, reply_to: str | None,
                correlation_id: str | None, body: bytes | None, requeue: bool | Forward | None) -> None:
        """Publish the reply (if any), then ack. ``requeue`` None = ack, False = reject,
        a Forward = publish its copy (retry, dead letter) and ack once that is confirmed."""
        channel = self.channel
        if channel is None:
            return
        if body is not None and reply_to:
            # Persistent: a reply waiting in the durable collector queue (submit) must survive a
            # broker restart; in a caller's transient reply queue the flag costs nothing.
            try:
                publish(channel, amqp.Message(body, content_type=envelope.CONTENT_TYPE,
                                              correlation_id=correlation_id, delivery_mode=2), "", reply_to)
            except UNENCODABLE as exc:
                # Never sendable, however often the request came back: dead-letter it (on
                # the loop thread, the forwarder's) instead of leaving it unacked.
                log.error("reply cannot be encoded; request dead-lettered", error=repr(exc)[:500])
                self.call_soon(self._finish, generation, message, None, None, None, self.redelivery.dead_letter(
                    message, self._queue_of(message), f"Reply could not be sent: {exc!r}", "UnsendableReply"))
                return
        if generation != self.generation:
            return
        if isinstance(requeue, Forward):
            queue_name = self._queue_of(message)
            self.forwarder.forward(channel, message.delivery_tag, requeue, lambda reason: self.redelivery.dead_letter(
                message, queue_name, reason, "UnencodableCopy", keep_headers=False))
        elif requeue is None:
            channel.basic_ack(message.delivery_tag)
        else:
            channel.basic_reject(message.delivery_tag, requeue=requeue)

    # --- handler threads ---------------------------------------------------------------
    def _work(self) -> None:
        get = self._inbox.get
        while True:
            item = get()
            if item is _STOP:
                return
            generation, message = item
            try:
                outcome = self._handle(message)
            except Exception as exc:  # noqa: BLE001 - a bug here must not kill the handler thread
                outcome = self._crashed(message, exc)
            self._finish_here(generation, message, *outcome)

    def _crashed(self, message: amqp.Message, exc: Exception) -> tuple[None, None, None, Forward | bool]:
        """A message the worker itself failed on: dead-lettered (without its headers if
        they are what fails); rejected without requeue when even that fails."""
        log.exception("worker failed to process a message")
        for keep_headers in (True, False):  # the headers from the wire may be what failed
            try:
                return None, None, None, self.redelivery.dead_letter(message, self._queue_of(message), repr(exc),
                                                                     "WorkerError", keep_headers=keep_headers)
            except Exception:  # noqa: BLE001 - never let one message end the handler thread
                log.exception("message cannot be dead-lettered", with_headers=keep_headers)
        return None, None, None, False

    def _finish_here(self, generation: int, message: amqp.Message, *outcome: Any) -> None:
        """Reply and ack from this handler thread, without a hop to the loop thread and
        back (frames are serialized by ``write_lock``, see AmqpLoop._lock_frames). While
        reconnecting there is no channel, and a Forward (retry, dead letter) is the
        forwarder's, which lives on the loop thread: those go through the loop."""
        # Never wait for the lock: when another thread is writing, the loop thread takes
        # this one over (it writes what piled up in one go) instead of handler threads
        # queueing on the lock, each sleep and wake-up a context switch.
        if not isinstance(outcome[-1], Forward) and self.write_lock.acquire(blocking=False):
            try:
                if self.channel is not None:
                    try:
                        self._finish(generation, message, *outcome)
                    except Exception as exc:  # noqa: BLE001 - dead connection: the loop reconnects, broker redelivers
                        log.warning("reply or ack not sent", error=repr(exc))
                    return
            finally:
                self.write_lock.release()
        self.call_soon(self._finish, generation, message, *outcome)

    def _handle(self, message: amqp.Message) -> tuple[Any, Any, bytes | None, bool | None]:
        """Run one request; returns (reply_to, correlation_id, reply body, requeue)."""
        queue_name = self._queue_of(message)
        if isinstance(message, UndecodableMessage):
            return self._undecodable(message, queue_name)
        poisoned = self.redelivery.poisoned(message, queue_name)
        if poisoned is not None:
            if poisoned.what == "dead_letter":
                log.error("message redelivered too often, dead-lettered unrun", queue=queue_name,
                          correlation_id=message.properties.get("correlation_id"))
            return None, None, None, poisoned
        event_consumer = self.event_consumers.get(message.delivery_info.get("consumer_tag"))
        if event_consumer is not None:
            return self._handle_event(event_consumer.subscription, message)
        started = time.perf_counter()
        properties = message.properties
        try:
            request = envelope.decode_request(message.body, properties, self.max_message_bytes)
        except BadMessage as exc:
            return self._refuse(message, exc.reason)
        trace_id = request.trace_id or request.correlation_id
        # Bound before anything is logged, so that even the "expired" and "unknown action"
        # lines carry the request's fields (and nothing of the previous request leaks in).
        logs.clear_request()
        logs.bind_request(service=self.service.name, action=request.action, correlation_id=request.correlation_id,
                          trace_id=trace_id, parent_id=request.headers.get("parent_id"))
        deadline = request.deadline
        if deadline is not None and time.time() > deadline:
            self.stats["expired"] += 1
            log.info("request expired, dropped unrun", action=request.action, correlation_id=request.correlation_id,
                     trace_id=trace_id, late_by=round(time.time() - deadline, 3))
            headers = properties.get("application_headers") or {}
            if attempts_made(headers) and request.reply_to:  # a retry came back too late: say why it failed
                return request.reply_to, request.correlation_id, envelope.error_reply(
                    str(headers.get(ERROR)), str(headers.get(ERROR_TYPE)), request.message_id), None
            return None, None, None, None
        handler = self.service.find(request.action) or self._builtins.get(request.action)
        if handler is None:
            self.stats["failed"] += 1
            if not request.reply_to:  # a cast: nobody hears the error, so say where the message went
                log.warning("unknown action, dead-lettered", action=request.action,
                            correlation_id=request.correlation_id, trace_id=trace_id,
                            dead_letter_queue=self.topology.dead_queue_name(self.service.name))
                return None, None, None, self.redelivery.dead_letter(
                    message, self.queue_name, f"Unknown action: {request.action}", "UnknownAction")
            log.warning("unknown action", action=request.action, correlation_id=request.correlation_id,
                        trace_id=trace_id)
            return request.reply_to, request.correlation_id, envelope.error_reply(
                f"Unknown action: {request.action}", "UnknownAction", request.message_id), None
        with self._bound(request.action, request.correlation_id, trace_id, deadline):
            try:
                result = handler(request.payload)
            except Exception as exc:  # noqa: BLE001 - every handler error becomes an error reply
                body = self._failed(exc, request, started)
                forward = self._after_failure(message, request, exc, started)
                if forward is not None:
                    return None, None, None, forward
            else:
                try:
                    body = envelope.ok_reply(result, request.message_id)
                except (TypeError, ValueError) as exc:
                    body = self._failed(TypeError(f"Result is not JSON serializable: {exc}"), request, started)
                else:
                    if len(body) > self.max_reply_bytes:
                        body = self._failed(ReplyTooLarge(f"Result is {len(body)} bytes of JSON; replies are limited "
                                                          f"to {self.max_reply_bytes}"), request, started)
                    else:
                        self.stats["succeeded"] += 1
                        log.debug("request handled", duration=round(time.perf_counter() - started, 6))
        return request.reply_to, request.correlation_id, body, None

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

    def _handle_event(self, subscription: EventSubscription, message: amqp.Message) -> tuple[Any, Any, None, bool | None]:
        """Run one event handler; (None, None, None, requeue): ack once it returned, else
        what :meth:`_event_failed` decides. Events get no reply and have no deadline."""
        started = time.perf_counter()
        try:
            event = envelope.decode_request(message.body, message.properties, self.max_message_bytes)
        except BadMessage as exc:
            self.stats["rejected"] += 1
            log.warning("bad event message", reason=exc.reason, handler=subscription.name)
            return None, None, None, self.redelivery.dead_letter(message, self._queue_of(message), exc.reason,
                                                                 "BadMessage")
        with self._bound(event.action, event.message_id, event.trace_id or event.message_id, None,
                         handler=subscription.name, parent_id=event.headers.get("parent_id")):
            try:
                subscription.function(event.payload)
            except Exception as exc:  # noqa: BLE001 - a failing handler must not kill the thread
                return None, None, None, self._event_failed(subscription, message, event, exc, started)
            self.stats["succeeded"] += 1
            log.debug("event handled", duration=round(time.perf_counter() - started, 6))
        return None, None, None, None

    def _event_failed(self, subscription: EventSubscription, message: amqp.Message, event: envelope.Request,
                      exc: Exception, started: float) -> Forward:
        """Where a failed event handler's message goes: the one place for retry and
        dead-letter policies. A retry through a delay queue back into this handler's own
        queue while ``subscription.retry`` allows, else a dead letter: never a hot requeue
        loop, never dropped. Runs inside the event's log context (trace id bound)."""
        self.stats["failed"] += 1
        log.warning("event handler failed", error=str(exc), error_type=type(exc).__name__,
                    duration=round(time.perf_counter() - started, 6))
        queue_name = self._queue_of(message)
        forward = self.redelivery.retry_later(message, queue_name, exc, subscription.retry)
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
        self.stats["failed"] += 1
        error_type = type(exc).__name__
        log.warning("handler failed", error=str(exc), error_type=error_type,
                    duration=round(time.perf_counter() - started, 6))
        return envelope.error_reply(str(exc), error_type, request.message_id)

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

    def _refuse(self, message: amqp.Message, reason: str) -> tuple[Any, Any, bytes | None, bool | None]:
        """A message that is not a valid request: answer it if it names a reply queue,
        otherwise dead-letter it with the reason (never a requeue loop)."""
        self.stats["rejected"] += 1
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
            return reply_to, sendable, envelope.error_reply(reason, "BadMessage", correlation_id), None
        return None, None, None, self.redelivery.dead_letter(message, self.queue_name, reason, "BadMessage")

    def _undecodable(self, message: UndecodableMessage, queue_name: str) -> tuple[Any, Any, bytes | None, Forward]:
        """A delivery whose properties (or routing key) did not decode: dead-lettered unrun
        with its raw bytes. If its reply address (reply_to and correlation_id) did decode,
        the caller also gets an error reply, rather than wait for its timeout."""
        self.stats["rejected"] += 1
        properties = message.properties
        reply_to, correlation_id = properties.get("reply_to"), properties.get("correlation_id")
        log.warning("undecodable message dead-lettered", problem=message.problem, queue=queue_name,
                    correlation_id=correlation_id, answered=bool(reply_to))
        forward = self.redelivery.undecodable(message, queue_name)
        if not (reply_to and correlation_id) or queue_name != self.queue_name:  # events get no replies
            return None, None, None, forward
        reason = f"Undecodable message: {message.problem}"
        return reply_to, correlation_id, envelope.error_reply(reason, "BadMessage", correlation_id), forward
