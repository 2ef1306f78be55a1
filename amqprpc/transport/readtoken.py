"""Who reads a client's socket: its loop thread, or a blocking caller waiting for its reply.

py-amqp is not thread-safe: one thread at a time may read a connection's frames and
dispatch them. That thread holds the connection's :class:`ReadToken`. Normally it is the
loop thread (:class:`~amqprpc.transport.ioloop.AmqpLoop`). But a blocking
``RpcClient.call()`` handed over to the loop costs three sleeps per call on the client:
the caller waits, the loop thread wakes for the broker's confirm of the request, and again
for the reply, which it then hands to the caller. So when blocking callers are what the
client does, the loop thread *lends* the socket to them (leader/follower):

- The loop lends once a blocking caller found it reading (:attr:`ReadToken.want`) and
  nothing else waits for the broker: no call pending, no confirm owed to a cast, no queued
  work, nothing buffered (the owner's ``may_lend``).
- A blocking caller, once it has published, takes the token if it is lent and free
  (:meth:`ReadToken.lead`). It then reads and dispatches every frame that arrives, anyone's
  (another caller's reply settles that caller), until its own call is settled, its deadline
  passes, or the loop asks for the socket back; then it releases the token. It only ever
  takes frames that have wholly arrived (:meth:`FrameReader.frame_now`): it never waits
  inside a frame, so it leaves within one ``poll()`` wake-up. A caller that finds the token
  held waits on its call as before (a *follower*): the leader's reads settle it. A leader
  that leaves while followers still wait wakes the loop thread, which takes the socket back.
- A leader sleeps through a lone small frame: its ``poll()`` wakes for more than
  :data:`LONE_FRAME` bytes (``SO_RCVLOWAT``), so the broker's confirm of the request, which
  arrives alone before the reply, costs no wake-up of its own; it is read with the reply. What
  a leader slept through (a confirm, a nack, a heartbeat) is read after :data:`QUIET_MS`,
  then twice as long each time, up to :data:`QUIET_MAX_MS`: a refused request still fails
  within milliseconds. The mark is 1 while a frame is partly read, and back to 1 when the
  leader leaves (the loop's own ``poll()`` sees every byte).
- Meanwhile the loop thread stays off the socket (:meth:`ReadToken.lend` serves the lease):
  it polls only its wake-up pipe (and the socket for POLLOUT while writes wait in a
  backlog), still sends heartbeats and finds a dead link by its silence (leaders record
  what they read in ``link.last_received``). It takes the socket back, signalling the
  give-back pipe every leader polls and waiting for the token, when work is queued for it
  (``call_soon``: declares, channel replacement, a publish handed over, the end of a
  connection, stopping), when the link is dead or in trouble, and when the lease ran out:
  nobody led for :data:`LEASE` seconds (while callers keep leading, the loop looks twice as
  late each time it finds one did, up to :data:`LEASE_MAX`). A ``call_async`` or a cast sent while the socket
  is lent wakes the loop too (its answer needs a reader whoever calls next).
- Frames that arrive while the socket is lent and nobody leads (a heartbeat, a reply that
  came after its call's deadline, a channel closed by the broker) are read by the next
  leader or by the loop at the lease's end: at most :data:`LEASE_MAX` late.
- Anything fatal a leader meets (the stream ended, a reset, a frame that is not AMQP, the
  broker closing the connection, an exception from a dispatch) is not raised in the caller:
  the leader hands it to the loop thread, which drops the connection and reconnects as if
  it had read it itself (pending calls fail with ConnectionLost); the caller then waits for
  that, like any follower.

A worker lends its socket the same way to its idle handler threads while it is quiet
(:meth:`~amqprpc.transport.consumer.Consumer.next_delivery`): a handler thread that takes the
token (:meth:`ReadToken.take`) reads until a delivery is in its inbox (:meth:`ReadToken.read_until`),
releases the token and runs that delivery itself. Its token is *prompt*: the loop takes a
released token back within a lease (a handler runs, deliveries for other threads may come),
while a token one leader holds all along (an idle worker) is looked at less and less often,
up to :data:`DOZE`; the loop wakes a handler thread to lead when it lends (``on_lend``).

TLS connections (py-amqp's own reads, :class:`~amqprpc.transport.framereader.TimeoutReads`)
are never lent.
"""
from __future__ import annotations

import collections
import math
import os
import select
import socket
import threading
import time
from typing import Any, Callable, Protocol

from amqprpc.transport.framereader import FrameReader
from amqprpc.transport.link import Link


class Loop(Protocol):
    """What the token uses of its :class:`~amqprpc.transport.ioloop.AmqpLoop` (the same package)."""

    _ops: collections.deque[Any]
    _signaled: bool
    _stopping: bool
    _wake_r: int

    def _wake(self) -> None: ...

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None: ...

# How long the loop thread stays off a lent socket after the last leader left (seconds): a
# caller making one call after another keeps leading without waking the loop per call; the
# loop wakes once per lease to see whether anyone still does.
LEASE = 0.010
# While callers keep leading, the loop looks twice as late each time, up to this (seconds):
# what arrives while nobody leads is read at most this late.
LEASE_MAX = 0.100
# A leader's poll() wakes only for more than this many bytes (SO_RCVLOWAT): a lone basic.ack
# or basic.nack frame is 21 bytes, a heartbeat 8; a reply is always more. What it slept
# through is read after QUIET_MS, then after twice as long, up to QUIET_MAX_MS.
LONE_FRAME = 21
# A worker's token (prompt): while one leader holds it all along the loop looks at it every lease,
# then twice as late each time, up to this (seconds); a leader that releases it meanwhile wakes
# the loop, which then looks a lease after that release (see _serve_lease).
DOZE = 0.64
QUIET_MS, QUIET_MAX_MS = 2, 64

_READ = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP
_TROUBLE = select.POLLERR | select.POLLHUP | select.POLLNVAL


class ReadToken:
    """The right to read one loop's socket (see the module). ``may_lend()`` says, on the loop
    thread, whether nothing but blocking callers waits for the broker."""

    def __init__(self, loop: Loop, may_lend: Callable[[], bool], lease: float = LEASE,
                 on_lend: Callable[[], None] | None = None, prompt: bool = False):
        self._loop = loop
        self._may_lend = may_lend
        self._on_lend = on_lend  # (loop thread) just lent: e.g. a worker wakes an idle handler thread to lead
        # A worker's: a token released and not taken again is taken back within a lease (its
        # leader runs a handler: deliveries for the other threads must not wait LEASE_MAX).
        self.prompt = prompt
        self.lendable = True  # False once the loop found a reader it cannot lend (TLS)
        self._dozing = False  # (prompt) the loop looks at a held token less often than every lease
        self.lease = lease
        self._token = threading.Lock()
        self._token.acquire()  # the loop thread's until it lends it
        self.lent = False
        self.want = False  # a blocking caller found the loop reading
        self._give_back = False  # the loop wants the socket: nobody leads meanwhile
        self._back_r, self._back_w = os.pipe()
        os.set_blocking(self._back_r, False)
        os.set_blocking(self._back_w, False)
        self._followers: set[Any] = set()  # calls of callers that found the token held
        self._released_at = 0.0
        self._link: Link | None = None
        self._poller: Any = None
        self.lends = self.leads = self.reclaims = 0  # (statistics: tests, the bench)
        # Leases that ran out unused (a caller that thinks longer than a lease between calls)
        # make the loop skip that many chances to lend, doubling up to 64: such a caller costs
        # the loop one wake-up per 64 calls, not one per call; the first lease used resets it.
        self._backoff = self._skip = 0
        self._leads_at_lend = 0

    def close(self) -> None:
        """The give-back pipe's descriptors (the loop thread ended; nothing leads)."""
        for fd in (self._back_r, self._back_w):
            if fd >= 0:
                os.close(fd)
        self._back_r = self._back_w = -1

    # --- the loop thread -----------------------------------------------------------------
    def lend(self, link: Link) -> None:
        """Lend the socket to blocking callers if nothing else waits for the broker, and stay
        off it until the loop needs it back; returns holding it again (also when raising)."""
        reader = link.reader
        loop = self._loop
        if not isinstance(reader, FrameReader):
            self.lendable = False
            return
        if reader.buffered or loop._ops or self._back_r < 0:
            return
        self.lent = True  # before may_lend(): a publish registered after it sees lent and wakes the loop
        if not self._may_lend():
            self.lent = False  # (still wanted: asked again after the next read)
            if self.prompt:  # a worker that is not quiet after all: its threads ask less often
                self.want = False
                self.back_off()
            return
        self.want = False
        if self._skip:
            self._skip -= 1
            self.lent = False
            return
        if link is not self._link:
            poller = select.poll()
            poller.register(link.sock.fileno(), _READ)
            poller.register(self._back_r, select.POLLIN)
            self._link, self._poller = link, poller
        self.lends += 1
        leads = self._leads_at_lend = self.leads
        self._released_at = time.monotonic()
        self._token.release()
        if self._on_lend is not None:
            self._on_lend()
        try:
            self._serve_lease(link, leads)
        finally:
            if self.lent:
                self._reclaim()

    def _serve_lease(self, link: Link, leads: int) -> None:
        loop = self._loop
        wake_fd, sock_fd = loop._wake_r, link.sock.fileno()
        poller = select.poll()
        poller.register(wake_fd, select.POLLIN)
        watching = False
        span, longest = self.lease, max(self.lease, LEASE_MAX)
        prompt, seen, look_at = self.prompt, self._released_at, self._released_at + self.lease
        if prompt:
            longest = max(self.lease, DOZE)
        while True:
            backlog = link.writer is not None and link.writer.backlog
            if backlog != watching:
                if backlog:
                    poller.register(sock_fd, select.POLLOUT)
                else:
                    poller.unregister(sock_fd)
                watching = backlog
            now = time.monotonic()
            if prompt:  # a lease after the last release, else when decided at the last look
                released = self._released_at
                end = released + self.lease if released != seen else look_at
            else:
                end = self._released_at + span
            if now >= end:
                if prompt:
                    if self._released_at != seen:  # released since the last look: still busy
                        seen, span = self._released_at, self.lease
                    else:  # held all along (an idle worker's leader): look less often
                        span = min(2 * span, longest)
                    self._dozing = span > self.lease  # before looking: a release after it wakes the loop
                if self._token.acquire(False):  # nobody leads: the loop reads again
                    self._taken_back()
                    self._backoff = 0 if self.leads != leads else min(2 * self._backoff or 1, 64)
                    self._skip = self._backoff
                    return
                end = look_at = now + span  # a caller leads: look again later
            due = link.due()
            until = end if due is None else min(end, due)
            for fd, event in poller.poll(max(0, int((until - now) * 1000)) + 1):
                if fd == sock_fd:
                    if event & select.POLLOUT:
                        link.flush()
                    if event & _TROUBLE:
                        return  # the socket needs the loop (lend() takes it back)
                    continue
                loop._signaled = False  # cleared before the pipe and the deque are looked at, as _run_ops
                try:
                    os.read(wake_fd, 4096)
                except BlockingIOError:
                    pass
                if loop._ops or loop._stopping:
                    self._reclaim()
                    loop._wake()  # the pipe was emptied: the loop's poll() must still see the work
                    return
            link.check(time.monotonic())  # heartbeats; LinkDead when silent too long
            if not prompt:
                # Callers kept leading: look less often (a wake-up per lease was 0.13 sleeps per call).
                span = min(2 * span, longest)

    def _reclaim(self) -> None:
        """Take the socket back: tell the leader, if any, and wait for the token (a leader
        leaves within one poll() wake-up: it never waits inside a frame)."""
        self._give_back = True
        try:
            os.write(self._back_w, b"x")
        except BlockingIOError:
            pass
        self._token.acquire()
        try:
            os.read(self._back_r, 4096)
        except BlockingIOError:
            pass
        self._taken_back()

    def _taken_back(self) -> None:
        self.lent = self._give_back = self._dozing = False
        self._followers.clear()  # the loop reads for them now
        self.reclaims += 1

    # --- a blocking caller -----------------------------------------------------------------
    def lead(self, call: Any, deadline: float) -> None:
        """After publishing ``call`` (its Future): read the socket while it is lent and free,
        until ``call`` is settled, ``deadline`` (monotonic) passes or the loop wants the
        socket. Otherwise return at once: the caller waits for ``call`` as before. Never
        raises what it reads (see the module)."""
        if not self.lent:
            self.want = True
            return
        token = self._token
        if self._give_back or not token.acquire(False):
            followers = self._followers
            followers.add(call)
            # A leader that left in between may not have seen this one follow: look again.
            if self._give_back or not self.lent or not token.acquire(False):
                return
            followers.discard(call)
        self.leads += 1
        if self._read(call.done, deadline, True):
            self._leave()

    def take(self) -> bool:
        """(A worker's idle handler thread) Take the token if it is lent and free: then read
        with :meth:`read_until`. False: the caller waits for work as before."""
        if not self.lent or self._give_back or not self._token.acquire(False):
            return False
        self.leads += 1
        return True

    def ask(self) -> bool:
        """(A worker's thread going idle while the worker is quiet and the loop reads) Ask the
        loop to lend: True when it should be woken to look; False while backing off (below)."""
        if self._skip:
            self._skip -= 1
            return False
        self.want = True
        return True

    def back_off(self) -> None:
        """(A worker's leader that found it busy: a burst) The loop reads from now on; the next
        chances to lend are skipped, twice as many each time (up to 64), so a worker whose
        quiet moments are short does not lend and take back the socket between every two
        deliveries; a lend that served more than 64 deliveries starts again at one."""
        self._backoff = 1 if self.leads - self._leads_at_lend > 64 else min(2 * self._backoff or 1, 64)
        self._skip = self._backoff

    def read_until(self, done: Callable[[], object]) -> None:
        """Holding the token (:meth:`take`): read and dispatch until ``done()`` (looked at after
        each read) or the loop wants the socket back; then release it. Never raises what it
        reads (see the module). Every frame wakes it (a worker receives no lone confirms)."""
        if self._read(done, math.inf, False):
            self._release()

    def _read(self, done: Callable[[], object], deadline: float, lone: bool) -> bool:
        """The leader's reads, until ``done()``, ``deadline`` or a give-back; ``lone``: sleep
        through lone small frames. False when it failed (the token handed to the loop already)."""
        link, poller, back = self._link, self._poller, self._back_r
        assert link is not None and isinstance(link.reader, FrameReader)
        reader, dispatch, sock = link.reader, link.connection.on_inbound_frame, link.sock
        dispatching = False
        lowat, quiet_ms, quiet = 1, QUIET_MS, False
        try:
            fetch = reader.buffered  # frames the loop left in the buffer (none, usually)
            while True:
                if fetch:
                    dispatching = True
                    frame = reader.frame_now(True)
                    if frame is not None and quiet:
                        link.last_received = time.monotonic()  # a small frame slept through
                    while frame is not None:
                        dispatch(frame)
                        frame = reader.frame_now(reader.buffered)  # more only while a frame is part here
                    dispatching = False
                if done() or self._give_back:
                    break
                now = time.monotonic()
                if now >= deadline:
                    break
                # Sleep through a lone small frame (the request's confirm, which comes before its
                # reply): wake for more than LONE_FRAME bytes, or after quiet_ms to read it anyway
                # (a nack fails its call then). Not while a frame is part here: wake for its rest.
                want = 1 if reader.buffered or not lone else LONE_FRAME + 1
                if want != lowat:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want)
                    lowat = want
                wait_ms = -1 if deadline == math.inf else int((deadline - now) * 1000) + 1
                if lowat > 1 and quiet_ms < wait_ms:
                    wait_ms = quiet_ms
                    quiet_ms = min(2 * quiet_ms, QUIET_MAX_MS)
                fetch = False
                events = poller.poll(wait_ms)
                quiet = not events and lowat > 1
                if quiet:  # read whatever small frame arrived meanwhile
                    fetch = True
                    continue
                for fd, _ in events:
                    if fd == back:
                        break
                    fetch = True
                else:
                    if fetch:
                        link.last_received = time.monotonic()
                    continue
                break  # give-back
        except BaseException as exc:
            _lowat(sock, lowat)
            if dispatching or isinstance(exc, Exception):
                self._fail(exc)
            else:
                self._leave()  # interrupted while polling (KeyboardInterrupt): nothing half-read
            if not isinstance(exc, Exception):
                raise
            return False
        _lowat(sock, lowat)
        return True

    def _release(self) -> None:
        self._released_at = time.monotonic()
        self._token.release()
        if self._dozing:  # the loop looks rarely while the token is held: now within a lease
            self._dozing = False
            self._loop._wake()

    def _leave(self) -> None:
        self._release()
        followers = self._followers
        if followers:
            for call in list(followers):
                if call.done():
                    followers.discard(call)
            if followers:  # they wait for frames nobody reads now: the loop takes the socket back
                self._loop.call_soon(_nothing)

    def _fail(self, exc: BaseException) -> None:
        """Something fatal for the connection: nobody leads on it any more; the loop thread
        drops it and reconnects, as if it had read it itself."""
        self._give_back = True
        self._token.release()
        if not isinstance(exc, Exception):
            exc = ConnectionError(f"a caller was interrupted while it dispatched a frame: {exc!r}")
        self._loop.call_soon(_raise, exc)


def _lowat(sock: socket.socket, lowat: int) -> None:
    """The socket's receive low-water mark back to 1 (the loop's poll() must see every byte)."""
    if lowat != 1:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        except OSError:  # the socket is gone already: so is the connection
            pass


def _nothing() -> None:
    """Wakes the loop thread (any queued work makes it take the socket back)."""


def _raise(exc: BaseException) -> None:
    raise exc
