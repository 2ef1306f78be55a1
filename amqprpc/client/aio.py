"""AsyncRpcClient: the client for asyncio code, on the same I/O machinery as RpcClient.

There is no second AMQP stack: an :class:`AsyncRpcClient` owns one :class:`RpcClient`
(one loop thread, one connection, one reply queue) and only changes how its caller waits.

- ``call`` sends through ``RpcClient.call_async`` (which only serializes the request and
  hands it to the loop thread) and awaits an asyncio future the loop thread's answer is
  passed to. Answers are passed in batches: the first of a burst wakes the event loop
  (``call_soon_threadsafe``, a write to its self-pipe), the ones that arrive before it
  ran join that wake-up. Thousands of calls in flight cost no thread each.
- ``cast``, ``publish_event`` and ``submit`` wait for a publisher confirm, which the sync
  client waits for in the caller's thread; here that wait runs on a small thread pool of
  this client's own (``confirm_threads``) so that the event loop never blocks and the
  application's default executor is not starved.
- Connecting and closing block (a TCP and AMQP handshake, joining the loop thread): both
  run off the event loop too.

The caller's contextvars (the trace id of an enclosing request) travel with every call.
"""
from __future__ import annotations

import asyncio
import collections
import contextvars
import functools
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from typing import Any, Callable

from amqprpc.client.rpc import _GRACE, RpcClient
from amqprpc.errors import CallTimeout


class AsyncRpcClient:
    """``async with AsyncRpcClient(source="web") as client: await client.call(...)``.

    Parameters: ``source`` as for :class:`RpcClient`; ``confirm_threads`` how many
    confirm waits (cast, publish_event, submit) may block at once, off the event loop;
    every other keyword (``broker_url``, ``timeout`` in seconds, ``topology``, ...) goes
    to :class:`RpcClient`.
    """

    def __init__(self, source: str = "amqprpc-client", *, confirm_threads: int = 16, **options: Any):
        self.source = source
        self._options = options
        self._confirm_threads = confirm_threads
        self._client: RpcClient | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._answered: collections.deque[Any] = collections.deque()  # (concurrent future, asyncio future)
        self._wake_scheduled = False

    async def __aenter__(self) -> "AsyncRpcClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect (off the event loop); raises ServiceUnavailable if the broker does not answer."""
        if self._client is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=self._confirm_threads, thread_name_prefix="amqprpc-aio")
        self._loop = asyncio.get_running_loop()
        try:
            self._client = await self._off_loop(RpcClient, self.source, **self._options)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise

    async def close(self) -> None:
        """Fail what is still pending and close the connection."""
        client, self._client = self._client, None
        if client is not None:
            await self._off_loop(client.close)
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    @property
    def client(self) -> RpcClient:
        """The underlying thread-safe RpcClient (same connection), e.g. for sync code paths."""
        if self._client is None:
            raise RuntimeError("AsyncRpcClient is not connected: use 'async with' or await connect()")
        return self._client

    async def call(self, service: str, action: str, payload: Any = None, *, timeout: float | None = None,
                   returns: Any = None, idempotency_key: str | None = None, priority: int | None = None) -> Any:
        """Call ``action`` on ``service`` and return its ``data``; raises as ``RpcClient.call``.
        ``timeout`` in seconds; ``payload``, ``returns``, ``idempotency_key`` and ``priority`` as
        for ``RpcClient.call``. Cancelling the awaiting task abandons the call (it still runs:
        revoke it with :meth:`revoke` and ``call_async(...).message_id``)."""
        client = self.client
        timeout = client.timeout if timeout is None else timeout
        data = await self._answer_of(client.call_async(service, action, payload, timeout=timeout,
                                                       idempotency_key=idempotency_key, priority=priority),
                                     f"{service}.{action}", timeout)
        if returns is None:
            return data
        from amqprpc.contracts import parse

        return parse(returns, data, f"{service}.{action}")

    async def _answer_of(self, future: Future[Any], what: str, timeout: float) -> Any:
        """The data of a call's concurrent future, awaited on this event loop."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # used from another event loop than it connected on
            try:
                return await asyncio.wait_for(asyncio.wrap_future(future), timeout + _GRACE)
            except asyncio.TimeoutError:
                raise CallTimeout(f"{what}: no answer within {timeout}s (its deadline timer was late)") from None
        waiter = loop.create_future()
        # The client's timer fails the call at its deadline; this only guards against a late timer.
        late = loop.call_later(timeout + _GRACE, _too_late, waiter, what, timeout)
        future.add_done_callback(lambda done: self._answer(done, waiter))
        try:
            return await waiter
        except asyncio.CancelledError:
            future.cancel()  # abandoned: an answer that still comes is dropped
            raise
        finally:
            late.cancel()

    def _answer(self, future: Future[Any], waiter: asyncio.Future[Any]) -> None:
        """A call's concurrent future is done (the client's loop or timer thread, or this one)."""
        self._answered.append((future, waiter))
        assert self._loop is not None  # wired only for calls made on self._loop
        if not self._wake_scheduled:
            # Cleared by _pass_answers before it empties the deque: an answer that sees it
            # set is always passed on by the wake-up already scheduled.
            self._wake_scheduled = True
            try:
                self._loop.call_soon_threadsafe(self._pass_answers)
            except RuntimeError:  # the event loop is closed: nobody awaits these any more
                self._wake_scheduled = False

    def _pass_answers(self) -> None:
        """On the event loop: every answer that arrived since the last wake-up."""
        self._wake_scheduled = False
        answered = self._answered
        while answered:
            future, waiter = answered.popleft()
            if waiter.done():  # cancelled, or timed out by _too_late
                continue
            if future.cancelled():
                waiter.cancel()
                continue
            exc = future.exception()
            if exc is not None:
                waiter.set_exception(exc)
            else:
                waiter.set_result(future.result())

    def call_async(self, service: str, action: str, payload: Any = None, *, timeout: float | None = None,
                   idempotency_key: str | None = None, priority: int | None = None) -> "asyncio.Future[Any]":
        """Send a call now and return an asyncio Future of its ``data`` (await it later);
        its ``message_id`` attribute is the request's message id, for :meth:`revoke`."""
        client = self.client
        timeout = client.timeout if timeout is None else timeout
        sent = client.call_async(service, action, payload, timeout=timeout, idempotency_key=idempotency_key,
                                 priority=priority)
        answer = asyncio.ensure_future(self._answer_of(sent, f"{service}.{action}", timeout))
        answer.message_id = getattr(sent, "message_id", None)  # type: ignore[attr-defined]
        return answer

    async def cast(self, service: str, action: str, payload: Any = None, *, timeout: float | None = None,
                   idempotency_key: str | None = None, countdown: float | None = None, eta: datetime | None = None,
                   priority: int | None = None) -> str:
        """As ``RpcClient.cast``: returns the message id once the broker confirmed the request."""
        message_id = await self._off_loop(self.client.cast, service, action, payload, timeout=timeout,
                                          idempotency_key=idempotency_key, countdown=countdown, eta=eta,
                                          priority=priority)
        return str(message_id)

    async def publish_event(self, name: str, payload: Any = None, *,
                            timeout: float | None = None) -> None:
        """As ``RpcClient.publish_event``: returns once the broker confirmed the event."""
        await self._off_loop(self.client.publish_event, name, payload, timeout=timeout)

    async def submit(self, service: str, action: str, payload: Any = None, *,
                     timeout: float | None = None, correlation_id: str | None = None,
                     idempotency_key: str | None = None, countdown: float | None = None, eta: datetime | None = None,
                     priority: int | None = None) -> str:
        """As ``RpcClient.submit``: returns the correlation id (= message id) once the broker confirmed."""
        correlation_id = await self._off_loop(self.client.submit, service, action, payload, timeout=timeout,
                                              correlation_id=correlation_id, idempotency_key=idempotency_key,
                                              countdown=countdown, eta=eta, priority=priority)
        return str(correlation_id)

    async def revoke(self, service: str, message_id: str, *more_ids: str, ttl: float | None = None) -> None:
        """As ``RpcClient.revoke`` (the Redis write runs off the event loop)."""
        await self._off_loop(self.client.revoke, service, message_id, *more_ids, ttl=ttl)

    async def run(self, workflow: Any) -> Any:
        """:meth:`RpcClient.run <amqprpc.client.rpc.RpcClient.run>` off the event loop; the
        handle's ``result()`` and ``status()`` are awaitables."""
        from amqprpc.workflow import AsyncWorkflowHandle

        return AsyncWorkflowHandle(await self._off_loop(self.client.run, workflow))

    async def revoke_workflow(self, workflow_id: str) -> bool:
        return bool(await self._off_loop(self.client.revoke_workflow, workflow_id))

    async def _off_loop(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        # run_in_executor does not carry contextvars over (asyncio.to_thread does, but on
        # the shared default executor): copy them, so nested calls keep the trace id.
        run = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._executor, run)


def _too_late(waiter: asyncio.Future[Any], what: str, timeout: float) -> None:
    if not waiter.done():
        waiter.set_exception(CallTimeout(f"{what}: no answer within {timeout}s (its deadline timer was late)"))
