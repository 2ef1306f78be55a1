"""Several services wired together without a broker: :class:`InMemoryClient`.

As dramatiq's ``StubBroker`` and FastStream's ``TestRabbitBroker`` do: it has RpcClient's
methods and routes them to ``Service`` handlers in this process, with the wire's semantics.
Payloads and results cross as JSON; a failing handler reaches the caller as
:class:`~amqprpc.errors.RemoteError` with its ``error_type``; a service nobody serves is
:class:`~amqprpc.errors.ServiceUnavailable` (no queue is bound); an unknown action is
``RemoteError(error_type="UnknownAction")``; an event reaches every matching handler of
every service (topic patterns); nested calls and events from handlers go through the same
client carrying the trace id and deadline; a handler's ``retry=`` policy reruns it
(without the backoff wait). A cast or event whose handler fails for good lands in
:attr:`InMemoryClient.dead_letters`.

Casts, events and submits are queued and delivered once the operation that sent them
(the outermost call, cast or publish on this thread) has finished, as a broker delivers
them after the publisher moved on; so when ``client.call(...)`` returns to a test, every
event that call caused has been handled. Everything runs on the caller's thread:
``call_async`` returns a Future that is already done.

No RabbitMQ; a handler that keeps state in Redis still needs Redis. For one service alone,
with its calls answered by canned answers, see :mod:`amqprpc.testing.fake`.
"""
from __future__ import annotations

import functools
import os
import socket
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Mapping, NamedTuple, Sequence, Tuple

import amqp

from amqprpc import logs
from amqprpc.client.countdown import check_priority, delay_of
from amqprpc.context import current, outgoing_headers
from amqprpc.errors import CallTimeout, ServiceUnavailable
from amqprpc.middleware import Hooks, Middleware
from amqprpc.middleware.timelimit import TimeLimit
from amqprpc.middleware.workflow import Workflows
from amqprpc.retry import ERROR, ERROR_TYPE, Retry, call_with_retry
from amqprpc.server.dispatcher import Decision, Dispatcher
from amqprpc.testing.dispatch import carry_out, local_dispatcher, request_message
from amqprpc.server.events import topic_matches
from amqprpc.service import Service, client_installed
from amqprpc.wire import envelope
from amqprpc.testing.fake import Recorder, parsed

log = logs.get_logger("amqprpc.testing")



class DeadLetter(NamedTuple):
    """A cast or event the in-memory client could not deliver or whose handler failed for good:
    where ``amqprpc dlq`` would find it on a broker."""

    service: str
    kind: str  # "cast" or "event"
    action: str
    payload: dict[str, Any]
    error_type: str
    error: str


class InMemoryClient(Recorder):
    """RpcClient's methods (``call``, ``call_async``, ``cast``, ``publish_event``, ``submit``,
    ``proxy``, ``close``), served by ``services``' handlers in this process; see the module.

    ``service.client`` inside those handlers is this client (for the handlers' thread
    only). Records what was sent (:attr:`sent`, :attr:`calls`, ...), the casts and events
    that failed for good (:attr:`dead_letters`) and the replies of submits (:attr:`replies`,
    by correlation id, as the collector would store them).
    """

    def __init__(self, *services: Service, source: str = "in-memory-client", timeout: float = 5.0,
                 middleware: Sequence[Middleware] = ()) -> None:
        super().__init__(source, timeout)
        # The worker's per-delivery hooks and scopes, as a worker runs them (not the
        # process-wide defaults: --metrics-port and OpenTelemetry are the worker's).
        # (TimeLimit: handlers' own time_limit= hold here too; a no-op for those without one)
        limits = () if any(isinstance(each, TimeLimit) for each in middleware) else (TimeLimit(),)
        self.hooks = Hooks(middleware, defaults=False, builtin=(Workflows(), *limits))
        self._dispatchers: Dict[str, Tuple[Dispatcher, Dict[str, str]]] = {}
        self.services: Dict[str, Service] = {}
        self.dead_letters: List[DeadLetter] = []
        self.replies: Dict[str, dict[str, Any]] = {}
        self._started = time.time()
        self._local = threading.local()
        for service in services:
            self.add(service)

    def add(self, service: Service) -> "InMemoryClient":
        """Serve ``service`` too (a second one of the same name would compete for its
        queue on a broker; here it replaces the first)."""
        self.services[service.name] = service
        return self

    # --- RpcClient's API ---------------------------------------------------------------
    def call(self, service: str, action: str, payload: Any = None, *, timeout: float | None = None,
             retry: Retry | None = None, returns: Any = None, idempotency_key: str | None = None) -> Any:
        timeout = self.timeout if timeout is None else timeout
        if retry is not None:
            return parsed(returns, call_with_retry(lambda left: self.call(service, action, payload, timeout=left,
                                                                          idempotency_key=idempotency_key),
                                                   retry, timeout), service, action)
        sent = self._record("call", service, action, payload)
        target = self._target(service, action)
        timeout, headers = self._headers(timeout, with_deadline=True, idempotency_key=idempotency_key)
        if timeout <= 0:
            raise CallTimeout(f"{service}.{action}: the deadline had already passed")
        with self._outermost():
            reply = self._deliver(target, "call", action, sent, headers)
        if reply is None or time.time() > headers["deadline"]:  # dropped unrun, or the caller stopped waiting
            raise CallTimeout(f"{service}.{action}: no answer within {timeout:g}s")
        if reply.get("success"):
            return parsed(returns, reply.get("data"), service, action)
        if reply.get("error_type") == "CallTimeout":
            raise CallTimeout(f"{service}.{action}: {reply.get('error')}")
        raise envelope.remote_error(reply)

    def cast(self, service: str, action: str, payload: Mapping[str, Any] | None = None, *,
             timeout: float | None = None, idempotency_key: str | None = None, countdown: float | None = None,
             eta: Any = None, priority: int | None = None, message_id: str | None = None,
             headers: Mapping[str, Any] | None = None) -> str:
        """Run at once, countdown or not (a test does not wait; countdown, eta and priority are
        checked as RpcClient checks them)."""
        delay_of(countdown, eta)
        check_priority(priority)
        sent = self._record("cast", service, action, payload)
        target = self._target(service, action)
        _, headers = self._headers(timeout, with_deadline=False, idempotency_key=idempotency_key)
        message_id = message_id or envelope.new_id()
        with self._outermost():
            self._later(lambda: self._deliver(target, "cast", action, sent, headers, message_id=message_id))
        return message_id

    def publish_event(self, name: str, payload: Mapping[str, Any] | None = None, *,
                      timeout: float | None = None) -> None:
        sent = self._record("event", None, name, payload)
        _, headers = self._headers(timeout, with_deadline=False)
        with self._outermost():
            for service in list(self.services.values()):
                for subscription in service.events.values():
                    if topic_matches(subscription.pattern, name):
                        self._later(functools.partial(self._deliver, service, "event", name, sent, headers,
                                                      subscription))

    def submit(self, service: str, action: str, payload: Mapping[str, Any] | None = None, *,
               timeout: float | None = None, idempotency_key: str | None = None, countdown: float | None = None,
               eta: Any = None, priority: int | None = None) -> str:
        delay_of(countdown, eta)
        check_priority(priority)
        sent = self._record("submit", service, action, payload)
        target = self._target(service, action)
        _, headers = self._headers(timeout, with_deadline=False, idempotency_key=idempotency_key)
        message_id = envelope.new_id()

        def run() -> None:
            reply = self._deliver(target, "submit", action, sent, headers, message_id=message_id)
            if reply is not None:
                self.replies[message_id] = reply

        with self._outermost():
            self._later(run)
        return message_id

    def run(self, workflow: Any) -> Any:
        """Start a workflow as :meth:`RpcClient.run <amqprpc.client.rpc.RpcClient.run>` does
        (its state in the real Redis); its steps have run when this returns."""
        from amqprpc.workflow import start

        with self._outermost():
            return start(self, workflow)

    # --- routing -----------------------------------------------------------------------
    def _target(self, service: str, action: str) -> Service:
        target = self.services.get(service)
        if target is None:  # what the broker's basic.return tells the real client
            raise ServiceUnavailable(f"{service}.{action}: no queue is bound for "
                                     f"'request.{service}' (is {service} deployed?)")
        return target

    def _headers(self, timeout: float | None, *, with_deadline: bool,
                 idempotency_key: str | None = None) -> Tuple[float, dict[str, Any]]:
        """As RpcClient does: inside a handler, the trace id goes on and the deadline is
        the earlier of the handler's and this call's own."""
        timeout = self.timeout if timeout is None else timeout
        now = time.time()
        deadline = now + timeout
        call = current.get()
        headers: Dict[str, Any] = {}
        if call is not None:
            headers.update(trace_id=call.trace_id, parent_id=call.correlation_id)
            if call.deadline is not None and call.deadline < deadline:
                deadline, timeout = call.deadline, call.deadline - now
        else:
            headers["trace_id"] = envelope.new_id()
        if with_deadline:
            headers["deadline"] = round(deadline, 6)
            headers[envelope.TIMEOUT_MS_HEADER] = max(0, int(timeout * 1000))
        if idempotency_key is not None:  # enforced by the Idempotency middleware, if given (it needs Redis)
            headers["idempotency_key"] = str(idempotency_key)
        headers.update(outgoing_headers.get() or {})
        return timeout, headers

    def _later(self, delivery: Callable[[], Any]) -> None:
        self._local.queue.append(delivery)

    def _outermost(self) -> "_Outermost":
        return _Outermost(self._local)

    def _deliver(self, service: Service, kind: str, action: str, payload: dict[str, Any], headers: dict[str, Any],
                 subscription: Any = None, message_id: str | None = None) -> dict[str, Any] | None:
        """One message through the envelope and the worker's own dispatcher (with this
        client's middleware); the reply envelope (as a dict) for calls and submits, None
        when there is none to send. What the dispatcher forwards is carried out here: a
        retry (or a recount) runs again at once, without the backoff wait; a message put
        off (rate limit, ETA) runs again after its delay; a dead letter lands in
        :attr:`dead_letters`."""
        dispatcher, tags = self._dispatcher(service)
        message = request_message(message_id=message_id or envelope.new_id(), source=self.source,
                                  service=service.name, kind=kind, action=action, payload=payload, headers=headers,
                                  consumer_tag=tags.get(subscription.name) if subscription is not None else None)
        decision = carry_out(dispatcher, message, self._installed)
        if decision.forward is not None:  # a dead letter
            self._dead_letter(service, kind, action, payload, decision.forward.message)
        return envelope.loads(decision.body) if decision.body is not None and decision.reply_to else None

    def _installed(self, dispatch: Callable[[], Decision]) -> Decision:
        with client_installed(self.services, self):  # service.client in its handlers: this client
            return dispatch()

    def _dispatcher(self, service: Service) -> Tuple[Dispatcher, Dict[str, str]]:
        """The service's dispatcher (made once) and its event handlers' consumer tags."""
        made = self._dispatchers.get(service.name)
        if made is None or made[0].service is not service:
            made = self._dispatchers[service.name] = local_dispatcher(
                service, self.hooks, self, {"ping": functools.partial(self._ping, service)})
        return made

    def _dead_letter(self, service: Service, kind: str, action: str, payload: dict[str, Any],
                     message: amqp.Message) -> None:
        headers = message.properties.get("application_headers") or {}
        error_type, error = str(headers.get(ERROR_TYPE)), str(headers.get(ERROR))
        log.warning("in-memory delivery dead-lettered", service=service.name, kind=kind, action=action,
                    error_type=error_type, error=error)
        with self._lock:
            self.dead_letters.append(DeadLetter(service.name, kind, action, payload, error_type, error))

    def _ping(self, service: Service, payload: Any) -> dict[str, Any]:
        return {"instance_id": "in-memory", "service": service.name, "host": socket.gethostname(),
                "pid": os.getpid(), "time": time.time(), "uptime": round(time.time() - self._started, 3)}


class _Outermost:
    """Around each operation of the client: when the outermost one on this thread ends, the
    casts and events queued meanwhile (by it, and by the handlers they ran) are delivered,
    first in, first out."""

    def __init__(self, local: threading.local) -> None:
        self.local = local
        if not hasattr(local, "queue"):
            local.queue, local.depth = deque(), 0

    def __enter__(self) -> None:
        self.local.depth += 1

    def __exit__(self, exc_type: Any, *exc_info: Any) -> None:
        local = self.local
        if local.depth > 1 or exc_type is not None:
            local.depth -= 1
            if local.depth == 0:
                local.queue.clear()
            return
        pending: Deque[Callable[[], Any]] = local.queue
        try:
            while pending:
                pending.popleft()()
        finally:
            local.depth -= 1
            pending.clear()  # only left over when a delivery raised: nothing is carried into the next test
