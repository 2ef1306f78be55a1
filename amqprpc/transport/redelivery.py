"""What happens to a consumed message that cannot simply be acked: retry later, or dead-letter.

Generic over *any* consumed message (requests, events): the worker asks this module for
a :class:`Forward` -- "publish this copy, confirmed, then ack the original" -- and the
loop thread carries it out with :class:`Forwarder`.

Why the worker publishes retries and dead letters itself instead of rejecting into a
broker-side dead-letter exchange: that would need ``x-dead-letter-exchange`` on the
request queue, and changing the arguments of an existing durable queue fails with
PRECONDITION_FAILED -- every ``service.X.request`` declared before this feature would
break. Publishing with publisher confirms before the ack loses nothing either: until the
broker confirmed the copy, the original stays unacked and is redelivered if we die.

Retry delays go through per-queue delay buckets (``{queue}.delay.{ms}``, see
:meth:`Topology.delay_queue`): a queue with ``x-message-ttl`` that dead-letters back into
the consumed queue. One TTL per bucket means no short delay waits behind a long one.

Poison messages (a handler that kills the process) are counted: quorum queues give
``x-delivery-count``; classic queues only say ``redelivered``, so a redelivered message is
first re-published with ``x-deliveries + 1`` (confirmed, then the original acked) and runs
as that copy, 0.1 s later. The next crash redelivers the copy, and so on until the count passes
``max_redeliveries`` and it is dead-lettered unrun.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import amqp
from kombu import Queue

from amqprpc import logs
from amqprpc import retry as h
from amqprpc.transport.framehandler import UndecodableMessage
from amqprpc.transport.ioloop import UNENCODABLE, channel_refused, close_quietly, open_confirm_channel, publish
from amqprpc.outcome import OutcomeKind
from amqprpc.retry import Retry
from amqprpc.wire.envelope import ARRIVED_PROPERTY, REMAINING_MS_HEADER
from amqprpc.wire.topology import Topology, declare_queue

log = logs.get_logger("amqprpc.redelivery")

# Time kept free before a call's deadline for the hops of one more attempt (publish,
# TTL expiry at the queue head, redelivery, the reply): a retry that would land after the
# deadline turns the caller's error reply into a CallTimeout.
DEADLINE_MARGIN_S = 0.25

# Re-declare a delay queue at least this often: publishing does not count as "use" for
# x-expires, a declare does. Topology.delay_queue_idle_ms must stay well above this.
DELAY_REDECLARE_S = 60.0

FORWARD_KINDS = (OutcomeKind.RETRIED, OutcomeKind.DEAD_LETTERED, OutcomeKind.RECOUNTED)

UNDECODABLE = "UndecodableMessage"  # x-error-type of what the frame handler could not decode


@dataclass
class Forward:
    """Publish ``message`` to ``routing_key`` through the default exchange, confirmed,
    then ack the original. ``declare`` is declared first (delay and dead queues);
    ``queue`` is the one the original was consumed from."""

    routing_key: str
    message: amqp.Message
    declare: Queue | None
    kind: OutcomeKind  # RETRIED, DEAD_LETTERED or RECOUNTED: what becomes of the original
    queue: str = ""
    # For a wait until a moment (countdown queues): picks (routing_key, declare) when the copy is
    # sent, so that time spent before sending (other forwards on the loop thread) is not waited twice.
    retarget: Callable[[], tuple[str, Queue]] | None = None


class Redelivery:
    """Builds :class:`Forward` decisions for the messages of one service (any thread).

    Parameters: ``service`` name; ``queue_type`` "classic" or "quorum" for the queues it
    declares; ``max_redeliveries`` how many redeliveries a message survives before it is
    dead-lettered unrun.
    """

    def __init__(self, service: str, topology: Topology, queue_type: str = "classic", max_redeliveries: int = 5):
        self.service = service
        self.topology = topology
        self.queue_type = queue_type
        self.max_redeliveries = max_redeliveries
        self.dead_queue = topology.dead_queue(service, queue_type)

    def poisoned(self, message: amqp.Message, queue: str) -> Forward | None:
        """Before running a message: a Forward when it was redelivered (recount it, or
        dead-letter it after too many), None to run it."""
        headers = h.headers_of(message)
        quorum_count = h.int_header(headers, "x-delivery-count")
        if quorum_count:
            count = quorum_count
        elif message.delivery_info.get("redelivered"):
            count = h.int_header(headers, h.DELIVERIES) + 1
        else:
            return None
        if count > self.max_redeliveries:
            return self.dead_letter(message, queue, f"Redelivered {count} times (does the handler kill the worker?)",
                                    "TooManyRedeliveries")
        if quorum_count:
            return None  # the broker counts for us; nothing to re-publish
        # The copy goes through the shortest delay bucket, not straight back: published
        # to the consumed queue it could be delivered -- and kill us again -- before the
        # broker's confirm let us ack the original, leaving both to be redelivered.
        delay_queue = self.topology.delay_queue(queue, self.topology.delay_buckets_ms[0], self.queue_type)
        return Forward(delay_queue.name, _copy(message, {h.DELIVERIES: count, **_origin(message, queue)}),
                       delay_queue, OutcomeKind.RECOUNTED, queue)

    def retry_later(self, message: amqp.Message, queue: str, exc: BaseException, policy: Retry | None,
                    deadline: float | None = None, duration: float = 0.0) -> Forward | None:
        """After a failed attempt: a Forward into a delay bucket when ``policy`` grants
        another attempt and the caller's ``deadline`` (epoch s) leaves room for it (the
        delay plus the last attempt's ``duration`` in s); None when this failure is final."""
        if policy is None:
            return None
        headers = h.headers_of(message)
        attempt = h.attempts_made(headers) + 1
        if not policy.retries(exc, attempt):
            return None
        ms = self.topology.delay_bucket_ms(policy.delay(attempt))
        now = time.time()
        if deadline is not None and now + ms / 1000.0 + duration + DEADLINE_MARGIN_S >= deadline:
            return None  # answer now with this error rather than let the caller time out
        delay_queue = self.topology.delay_queue(queue, ms, self.queue_type)
        update = {h.ATTEMPTS: attempt, h.FIRST_FAILURE: headers.get(h.FIRST_FAILURE) or now, h.LAST_FAILURE: now,
                  h.ERROR: _text(exc), h.ERROR_TYPE: type(exc).__name__, **_origin(message, queue)}
        if deadline is not None:  # what is left once the delay is over, counted again from the next arrival
            update[REMAINING_MS_HEADER] = max(0, int((deadline - now) * 1000) - ms)
        return Forward(delay_queue.name, _copy(message, update), delay_queue, OutcomeKind.RETRIED, queue)

    def later(self, message: amqp.Message, queue: str, delay: float, kind: OutcomeKind) -> Forward:
        """The message back into ``queue`` after about ``delay`` seconds, through the
        smallest delay bucket not shorter (the longest one at most): for middleware that
        puts a message off (rate limit, an ETA not yet due). Headers kept, attempts not
        counted; nothing waits unacked in the worker meanwhile."""
        ms = self.topology.delay_bucket_ms(delay)
        delay_queue = self.topology.delay_queue(queue, ms, self.queue_type)
        return Forward(delay_queue.name, _copy(message, _origin(message, queue)), delay_queue, kind, queue)

    def dead_letter(self, message: amqp.Message, queue: str, error: str, error_type: str,
                    keep_headers: bool = True) -> Forward:
        """The message, to ``service.{svc}.dead``, with why and where from in its headers.
        Without ``keep_headers`` the original's headers travel only as text
        (``x-original-headers``): for the headers py-amqp decodes but cannot encode again."""
        headers = h.headers_of(message)
        now = time.time()
        update = {h.ATTEMPTS: h.attempts_made(headers) + 1, h.FIRST_FAILURE: headers.get(h.FIRST_FAILURE) or now,
                  h.LAST_FAILURE: now, h.ERROR: error[:4000], h.ERROR_TYPE: error_type, **_origin(message, queue)}
        if not keep_headers:
            update = {h.ATTEMPTS: 1, h.FIRST_FAILURE: now, h.LAST_FAILURE: now, h.ERROR: error[:4000],
                      h.ERROR_TYPE: error_type, "x-original-headers": repr(headers)[:4000],
                      **{k: str(v) for k, v in _origin(message, queue).items()}}
        copy = _copy(message, update, keep_headers)
        return Forward(self.dead_queue.name, copy, self.dead_queue, OutcomeKind.DEAD_LETTERED, queue)

    def undecodable(self, message: UndecodableMessage, queue: str) -> Forward:
        """A delivery whose properties or routing key did not decode
        (:mod:`amqprpc.transport.framehandler`): dead-lettered unrun, with its body, the properties
        that did decode, the property bytes as received (``x-raw-properties``) and what
        did not decode (``x-error``)."""
        forward = self.dead_letter(message, queue, f"Undecodable message: {message.problem}", UNDECODABLE)
        if message.raw_properties:
            forward.message.properties["application_headers"][h.RAW_PROPERTIES] = message.raw_properties
        return forward

    def wait(self, message: amqp.Message, queue: str, delay: float, kind: OutcomeKind,
             update: dict[str, Any] | None = None) -> Forward:
        """The message back into ``queue`` after ``delay`` seconds, through the countdown queue
        of that delay (:meth:`Topology.countdown_queue`: rounded up to 50 ms under 10 s, so
        much closer than the retry buckets), with ``update`` merged into its headers: an ETA
        not yet due, a rate-limited message waiting for its reserved slot."""
        due = time.time() + delay
        topology = self.topology

        def retarget() -> tuple[str, Queue]:
            left = topology.countdown_queue(queue, topology.countdown_ms(max(0.0, due - time.time())))
            return left.name, left

        waiting = topology.countdown_queue(queue, topology.countdown_ms(delay))
        return Forward(waiting.name, _copy(message, {**(update or {}), **_origin(message, queue)}), waiting, kind,
                       queue, retarget)


class Forwarder:
    """Carries out :class:`Forward` decisions on the loop thread, over its own confirm
    channel; acks (or, on a nack, requeues) the original when the broker answered.

    A channel the broker keeps nacking (one opened while a quorum queue's leader was being
    elected stays refused for its whole life) is replaced: its unconfirmed originals are
    requeued and a fresh channel carries on.
    """

    def __init__(self) -> None:
        self.channel: amqp.Channel | None = None
        self._connection: Any = None
        self._pending: dict[int, tuple[amqp.Channel, int, str]] = {}
        self._seq = 0
        self._opened = 0.0
        self._refused = False
        self._declared: dict[str, float] = {}
        self.idle = threading.Event()  # set while no copy awaits its confirm (for a warm stop)
        self.idle.set()
        # Confirmed copies by kind (retried, dead_lettered, recounted), refused ones, replaced channels.
        self.stats = {**{kind.value: 0 for kind in FORWARD_KINDS}, "nacked": 0, "channels_replaced": 0}

    def connect(self, connection: Any) -> None:
        self._connection, self._declared = connection, {}
        self._open()

    def _open(self) -> None:
        channel = open_confirm_channel(self._connection, self._on_ack, self._on_nack)
        self.channel, self._pending, self._seq, self._opened = channel, {}, 0, time.monotonic()
        self._refused = False
        self.idle.set()

    def _replace(self) -> None:
        """A new confirm channel; what the old one has not confirmed goes back to its queue."""
        old, pending = self.channel, self._pending
        for consume_channel, original, _ in pending.values():
            if consume_channel.is_open:
                consume_channel.basic_reject(original, requeue=True)
        close_quietly(old)
        self.stats["channels_replaced"] += 1
        log.warning("forwarding channel replaced: the broker kept refusing its publishes", requeued=len(pending))
        self._open()

    def disconnected(self) -> None:
        # Unconfirmed copies may or may not be stored; their originals were not acked
        # and come back from the broker: at-least-once, never lost.
        self.channel, self._pending = None, {}
        self.idle.set()

    def send(self, consume_channel: amqp.Channel, delivery_tag: int, forward: Forward) -> None:
        """Publish the copy; the original is acked when the broker confirms it. Raises
        what py-amqp raises when the copy cannot be encoded (nothing is written then)."""
        if self.channel is None:
            return  # the original is redelivered after the reconnect
        if self._refused:
            self._replace()
        channel = self.channel
        if forward.retarget is not None:
            forward.routing_key, forward.declare = forward.retarget()
        if forward.declare is not None:
            now = time.monotonic()
            if now - self._declared.get(forward.declare.name, -DELAY_REDECLARE_S) >= DELAY_REDECLARE_S:
                # On a channel of its own: a refused declare closes its channel, and this
                # one carries confirms still to come.
                declaring = self._connection.channel()
                try:
                    declaring, _ = declare_queue(self._connection, declaring, forward.declare)
                finally:
                    close_quietly(declaring)
                self._declared[forward.declare.name] = now
        _fit_frame(forward.message, channel.connection.frame_max)
        publish(channel, forward.message, "", forward.routing_key)
        # Counted only once published: a copy that failed to encode was never sent, and the
        # broker numbers its confirms by what it received.
        self._seq += 1
        self._pending[self._seq] = (consume_channel, delivery_tag, forward.kind.value)
        self.idle.clear()

    def forward(self, consume_channel: amqp.Channel, delivery_tag: int, forward: Forward,
                bare: Callable[[str], Forward]) -> None:
        """:meth:`send`, never failing the loop over one message: when the copy cannot be
        encoded, ``bare(reason)`` is sent instead (a dead letter without the original's
        headers); when even that cannot, the original is rejected without requeue."""
        try:
            self.send(consume_channel, delivery_tag, forward)
            return
        except UNENCODABLE as exc:
            reason = f"its {forward.kind.value} copy could not be encoded: {exc!r}"
        log.error("forwarded copy cannot be encoded; dead-lettered without its headers", error=reason[:500])
        try:
            self.send(consume_channel, delivery_tag, bare(reason))
        except UNENCODABLE as exc:
            log.error("dead letter cannot be encoded either; message rejected", error=repr(exc)[:500])
            consume_channel.basic_reject(delivery_tag, requeue=False)

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        for consume_channel, original, what in self._take(delivery_tag, multiple):
            self.stats[what] = self.stats.get(what, 0) + 1  # features forward kinds of their own (delayed...)
            if consume_channel.is_open:
                consume_channel.basic_ack(original)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        for consume_channel, original, what in self._take(delivery_tag, multiple):
            self.stats["nacked"] += 1
            log.warning("broker refused a forwarded copy; original requeued", what=what)
            if consume_channel.is_open:
                consume_channel.basic_reject(original, requeue=True)
        # Replaced before the next send (not from inside this frame's dispatch).
        self._refused = self._refused or channel_refused(self._opened)

    def _take(self, delivery_tag: int, multiple: bool) -> list[Any]:
        if not multiple:
            entry = self._pending.pop(delivery_tag, None)
            taken = [entry] if entry else []
        else:
            taken = [self._pending.pop(tag) for tag in [t for t in self._pending if t <= delivery_tag]]
        if not self._pending:
            self.idle.set()
        return taken


def _origin(message: amqp.Message, queue: str) -> dict[str, Any]:
    """Where the message first came from; kept from an earlier forward if there was one."""
    headers = h.headers_of(message)
    info = message.delivery_info or {}
    return {h.ORIGINAL_EXCHANGE: headers.get(h.ORIGINAL_EXCHANGE, info.get("exchange", "")),
            h.ORIGINAL_ROUTING_KEY: headers.get(h.ORIGINAL_ROUTING_KEY, info.get("routing_key", "")),
            h.ORIGINAL_QUEUE: headers.get(h.ORIGINAL_QUEUE, queue)}


def _copy(message: amqp.Message, update: dict[str, Any], keep_headers: bool = True) -> amqp.Message:
    """The same body and properties (ids kept), persistent, with ``update`` merged into
    the headers. ``expiration`` is dropped: the copy waits in a delay or dead queue and
    must not vanish there (the deadline in the envelope still guards calls). ``user_id``
    moves into a header: RabbitMQ refuses (closing our channel) a publish whose user_id
    is not the publishing connection's user. ``CC``/``BCC`` are dropped: the broker would
    route every copy to those keys again."""
    properties = {k: v for k, v in message.properties.items()
                  if k not in ("expiration", "application_headers", "user_id", ARRIVED_PROPERTY)}
    headers = {k: v for k, v in (h.headers_of(message) if keep_headers else {}).items()
               if not (isinstance(k, str) and k.startswith(_BROKER_HEADERS))  # a key py-amqp could
               and k not in ("CC", "BCC")}                                    # not decode is bytes
    if message.properties.get("user_id"):
        headers["x-original-user-id"] = message.properties["user_id"]
    headers.update(update)
    properties["application_headers"] = headers
    properties["delivery_mode"] = 2
    body = message.body
    if isinstance(body, str):  # py-amqp leaves an empty body as "": bytes, or it would encode
        body = body.encode()   # it with the content_encoding, whatever codec a peer named there
    return amqp.Message(body, **properties)


# Headers the broker adds (dead-lettering, quorum delivery counts): not copied.
_BROKER_HEADERS = ("x-death", "x-first-death", "x-last-death", "x-delivery-count")

# A content header frame: 7-byte frame header, class id, weight and body size (12 bytes),
# the properties, the frame-end octet.
_HEADER_FRAME_OVERHEAD = 20


def _fit_frame(message: amqp.Message, frame_max: int) -> None:
    """Make the copy's properties fit one frame: the broker closes the connection on a
    larger content header (FRAME_ERROR), which would redeliver the original, forever.
    The original's own headers go first, then the tail of the raw property bytes."""
    limit = frame_max - _HEADER_FRAME_OVERHEAD
    over = len(message._serialize_properties()) - limit
    if over <= 0:
        return
    headers = message.properties["application_headers"]
    kept = {k: v for k, v in headers.items() if k in h.BOOKKEEPING}
    kept["x-headers-dropped"] = len(headers) - len(kept)
    message.properties["application_headers"] = kept
    over = len(message._serialize_properties()) - limit
    if over > 0 and h.RAW_PROPERTIES in kept:
        raw = kept[h.RAW_PROPERTIES]
        kept[h.RAW_PROPERTIES] = raw[:max(0, len(raw) - over - 64)]
        kept["x-raw-properties-size"] = len(raw)
    log.warning("forwarded copy's headers cut to fit a frame", frame_max=frame_max,
                dropped=kept["x-headers-dropped"])


def _text(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__)[:4000]

