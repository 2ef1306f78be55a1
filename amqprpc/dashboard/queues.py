"""Queue depths for the dashboard: from RabbitMQ's management HTTP API when it is enabled
(ready, unacked, consumers, publish and deliver rates, every queue of a service), else from
passive declares over AMQP (ready and consumers of the queues whose names the topology
gives: request, dead-letter and delay queues; unacked and rates are then unknown: None).

A passive declare of a missing queue closes the channel it ran on (404), so a fresh channel
is opened after each miss; the connection is kept between polls and reopened after a loss.
Delay queues come and go (they expire when idle), and there are 14 per request queue, so
in passive mode they are looked up every ``delay_every`` polls only.
"""
from __future__ import annotations

import base64
import json
import threading
import urllib.parse
import urllib.request
from typing import Any, Protocol

import amqp
from kombu import Connection

from amqprpc.config import redact, ssl_options
from amqprpc.wire.topology import DEFAULT_TOPOLOGY, Topology

QueueRow = dict[str, Any]  # name, service, kind, ready, unacked, consumers, publish_rate, deliver_rate


class QueueSource(Protocol):
    source: str

    def queues(self, services: list[str]) -> list[QueueRow]: ...

    def close(self) -> None: ...


def kind_of(name: str, service: str, topology: Topology = DEFAULT_TOPOLOGY) -> str:
    """What a queue of ``service`` is for: request, dead, delay, event (or other)."""
    if name == topology.dead_queue_name(service):
        return "dead"
    if ".delay." in name:
        return "delay"
    if name == topology.request_queue_format.format(service=service):
        return "request"
    if name.startswith(f"service.{service}.event."):
        return "event"
    return "other"


def _row(name: str, service: str, ready: int | None, unacked: int | None, consumers: int | None,
         publish_rate: float | None = None, deliver_rate: float | None = None,
         topology: Topology = DEFAULT_TOPOLOGY) -> QueueRow:
    return {"name": name, "service": service, "kind": kind_of(name, service, topology), "ready": ready,
            "unacked": unacked, "consumers": consumers, "publish_rate": publish_rate, "deliver_rate": deliver_rate}


class PassiveQueues:
    """Depths by passive ``queue.declare`` (no management plugin needed)."""

    source = "amqp"

    def __init__(self, broker_url: str, topology: Topology = DEFAULT_TOPOLOGY, delay_every: int = 10):
        self.broker_url = broker_url
        self.topology = topology
        self.delay_every = delay_every
        self._connection: Any = None
        self._channel: Any = None
        self._polls = 0
        self._delay_names: dict[str, list[str]] = {}  # service -> delay queues seen at the last look
        self._lock = threading.Lock()

    def _open(self) -> Any:
        if self._connection is None:
            connection = Connection(self.broker_url, connect_timeout=3, ssl=ssl_options(self.broker_url))
            connection.connect()
            self._connection = connection
        if self._channel is None:
            self._channel = self._connection.channel()
        return self._channel

    def declare(self, name: str) -> tuple[int, int] | None:
        """(ready, consumers) of ``name``, None when it does not exist."""
        try:
            ok = self._open().queue_declare(name, passive=True)
        except amqp.exceptions.NotFound:
            self._channel = None  # the broker closed that channel
            return None
        except Exception:
            self.close()
            raise
        return int(ok.message_count), int(ok.consumer_count)

    def queues(self, services: list[str]) -> list[QueueRow]:
        with self._lock:
            self._polls += 1
            look_for_delays = self._polls % self.delay_every == 1 or self.delay_every <= 1
            rows: list[QueueRow] = []
            for service in services:
                request = self.topology.request_queue_format.format(service=service)
                if look_for_delays:
                    self._delay_names[service] = [
                        self.topology.delay_queue_format.format(queue=request, ms=ms)
                        for ms in self.topology.delay_buckets_ms]
                names = [request, self.topology.dead_queue_name(service), *self._delay_names.get(service, [])]
                present: list[str] = []
                for name in names:
                    found = self.declare(name)
                    if found is None:
                        continue
                    ready, consumers = found
                    present.append(name)
                    rows.append(_row(name, service, ready, None, consumers, topology=self.topology))
                self._delay_names[service] = [name for name in present if kind_of(name, service) == "delay"]
            return rows

    def close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            try:
                connection.release()
            except Exception:  # noqa: BLE001 - closing a dead connection
                pass


class ManagementQueues:
    """Depths and rates from RabbitMQ's management HTTP API (``rabbitmq-plugins enable
    rabbitmq_management``): one GET per poll for every queue of the vhost."""

    source = "management"
    COLUMNS = ("name,messages_ready,messages_unacknowledged,consumers,"
               "message_stats.publish_details.rate,message_stats.deliver_get_details.rate")

    def __init__(self, management_url: str, broker_url: str, topology: Topology = DEFAULT_TOPOLOGY,
                 timeout: float = 3.0):
        parts = urllib.parse.urlsplit(management_url)
        broker = urllib.parse.urlsplit(broker_url.split(";")[0])
        user = urllib.parse.unquote(parts.username or broker.username or "guest")
        password = urllib.parse.unquote(parts.password or broker.password or "guest")
        host = parts.hostname or "localhost"
        netloc = f"[{host}]" if ":" in host else host
        port = f":{parts.port}" if parts.port else ""
        self.base = f"{parts.scheme or 'http'}://{netloc}{port}{parts.path.rstrip('/')}"
        vhost = urllib.parse.unquote(broker.path[1:]) if broker.path not in ("", "/") else "/"
        self.vhost = vhost
        self._authorization = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.topology = topology
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"<ManagementQueues {redact(self.base)}>"

    def fetch(self) -> list[dict[str, Any]]:
        url = (f"{self.base}/api/queues/{urllib.parse.quote(self.vhost, safe='')}"
               f"?columns={urllib.parse.quote(self.COLUMNS, safe=',')}")
        request = urllib.request.Request(url, headers={"Authorization": self._authorization})
        with urllib.request.urlopen(request, timeout=self.timeout) as answer:  # noqa: S310 - operator's URL
            found = json.loads(answer.read())
        return found if isinstance(found, list) else []

    def queues(self, services: list[str]) -> list[QueueRow]:
        rows: list[QueueRow] = []
        listed = self.fetch()
        for service in services:
            prefix = f"service.{service}."
            for queue in listed:
                name = str(queue.get("name", ""))
                if not name.startswith(prefix):
                    continue
                stats = queue.get("message_stats") or {}
                rows.append(_row(name, service, queue.get("messages_ready"), queue.get("messages_unacknowledged"),
                                 queue.get("consumers"), (stats.get("publish_details") or {}).get("rate"),
                                 (stats.get("deliver_get_details") or {}).get("rate"), topology=self.topology))
        return rows

    def close(self) -> None:
        pass
