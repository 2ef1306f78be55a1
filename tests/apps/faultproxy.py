"""A TCP proxy between AMQP peers and a broker, whose faults the test steers.

- :meth:`FaultProxy.delay`: every chunk is forwarded that much later, in both directions.
- :meth:`FaultProxy.blackhole`: nothing is read or forwarded any more, in either direction,
  but every socket stays open (a stuck proxy or load balancer, a route that drops
  packets): senders' buffers fill, no FIN, no RST, no error. New connections wait in the
  listen backlog.
- :meth:`FaultProxy.reset`: every connection is aborted with an RST, both ways.
- :meth:`FaultProxy.heal`: forward at once again (what waited during a blackhole goes on).

One thread does all of it with a selector, so a test's faults take effect in the order given.
"""
from __future__ import annotations

import heapq
import itertools
import selectors
import socket
import struct
import threading
import time


class FaultProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1"):
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._commands: list = []
        self._lock = threading.Lock()
        self._peer: dict[socket.socket, socket.socket] = {}  # each side of a connection -> the other
        self._delay = 0.0
        self._blackholed = False
        self._later: list = []  # heap of (due, seq, destination, data)
        self._seq = itertools.count()
        self.accepted = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()

    def url(self, broker_url: str) -> str:
        """``broker_url`` through this proxy (same credentials and vhost, the proxy's port)."""
        scheme, rest = broker_url.split("://", 1)
        credentials, location = rest.rsplit("@", 1)
        vhost = location.split("/", 1)[1] if "/" in location else ""
        return f"{scheme}://{credentials}@127.0.0.1:{self.port}/{vhost}"

    # --- faults (any thread) ---------------------------------------------------------
    def delay(self, seconds: float) -> None:
        self._command("delay", seconds)

    def blackhole(self) -> None:
        self._command("blackhole")

    def heal(self) -> None:
        self._command("heal")

    def reset(self) -> None:
        self._command("reset")

    def close(self) -> None:
        self._command("close")
        self._thread.join(5)

    def _command(self, *command) -> None:
        done = threading.Event()
        with self._lock:
            self._commands.append((command, done))
        self._wake_w.send(b"x")
        assert done.wait(5), f"fault proxy did not apply {command}"

    # --- proxy thread ----------------------------------------------------------------
    def _run(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        while not self._closed:
            timeout = None
            if self._later and not self._blackholed:
                timeout = max(0.0, self._later[0][0] - time.monotonic())
            for key, _ in self._selector.select(timeout):
                if key.data == "accept":
                    self._accept()
                elif key.data == "wake":
                    self._apply_commands()
                else:
                    self._forward(key.fileobj)
            while self._later and not self._blackholed and self._later[0][0] <= time.monotonic():
                _, _, destination, data = heapq.heappop(self._later)
                self._send(destination, data)
        for sock in list(self._peer):
            sock.close()
        self._listener.close()

    def _accept(self) -> None:
        client, _ = self._listener.accept()
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            client.close()
            return
        self.accepted += 1
        self._peer[client], self._peer[upstream] = upstream, client
        for sock in (client, upstream):
            sock.setblocking(True)
            self._selector.register(sock, selectors.EVENT_READ, "pipe")

    def _forward(self, source: socket.socket) -> None:
        try:
            data = source.recv(65536)
        except OSError:
            data = b""
        if source not in self._peer:
            return
        if not data:
            self._drop(source, abort=False)
            return
        destination = self._peer[source]
        if self._delay:
            heapq.heappush(self._later, (time.monotonic() + self._delay, next(self._seq), destination, data))
        else:
            self._send(destination, data)

    def _send(self, destination: socket.socket, data: bytes) -> None:
        if destination not in self._peer:
            return
        try:
            destination.sendall(data)
        except OSError:
            self._drop(destination, abort=True)

    def _drop(self, sock: socket.socket, abort: bool) -> None:
        other = self._peer.pop(sock, None)
        for each in (sock, other):
            if each is None:
                continue
            self._peer.pop(each, None)
            try:
                self._selector.unregister(each)
            except (KeyError, ValueError):
                pass
            if abort:  # RST instead of FIN
                each.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            each.close()

    def _apply_commands(self) -> None:
        self._wake_r.recv(4096)
        with self._lock:
            commands, self._commands = self._commands, []
        for (name, *args), done in commands:
            if name == "delay":
                self._delay = args[0]
            elif name == "blackhole" and not self._blackholed:
                self._blackholed = True
                for sock in [self._listener, *self._peer]:
                    self._selector.unregister(sock)
            elif name == "heal" and self._blackholed:
                self._blackholed = False
                self._selector.register(self._listener, selectors.EVENT_READ, "accept")
                for sock in self._peer:
                    self._selector.register(sock, selectors.EVENT_READ, "pipe")
            elif name == "reset":
                for sock in list(self._peer):
                    if sock in self._peer:
                        self._drop(sock, abort=True)
                self._later = [item for item in self._later if item[2] in self._peer]
            elif name == "close":
                self._closed = True
            done.set()
