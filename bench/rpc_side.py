"""The amqprpc side: the same scenarios through the public RpcClient and AsyncRpcClient APIs."""
from __future__ import annotations

import asyncio
import itertools
import threading
import time

from amqprpc import AsyncRpcClient, RpcClient

from .measure import Sample, from_tasks

perf = time.perf_counter


class RpcSide:
    def __init__(self, url: str, service: str, payload: dict):
        self.client = RpcClient("bench", broker_url=url, timeout=30.0)
        self.url, self.service, self.payload = url, service, payload
        self.casts_sent = 0
        self._aio_loop: asyncio.AbstractEventLoop | None = None
        self._aio: AsyncRpcClient | None = None

    def close(self) -> None:
        self.client.close()
        if self._aio_loop is not None:
            self._aio_loop.run_until_complete(self._aio.close())
            self._aio_loop.close()

    def sequential(self, count: int) -> Sample:
        return _one_at_a_time(count, self.client.call, self.service, "echo", self.payload)

    def pipelined(self, count: int, in_flight: int, record: bool = True, payload: dict | None = None) -> Sample:
        """``count`` calls through ``call_async``, never more than ``in_flight`` pending.
        ``record=False`` keeps no latencies (so the RSS scenario measures the client only);
        ``payload`` defaults to the bench's small one."""
        slots = threading.Semaphore(in_flight)
        all_done = threading.Event()
        latencies, errors = [], []
        finished = itertools.count(1)  # next() is atomic; callbacks may run on either thread
        progress = [0]
        call_async, service, payload = self.client.call_async, self.service, payload or self.payload

        def done(future, t0) -> None:
            if record:
                latencies.append(perf() - t0)
            if future.exception() is not None:
                errors.append(future.exception())
            slots.release()
            progress[0] = next(finished)
            if progress[0] == count:
                all_done.set()

        started = perf()
        for _ in range(count):
            slots.acquire()
            t0 = perf()
            call_async(service, "echo", payload).add_done_callback(lambda f, t0=t0: done(f, t0))
        if not all_done.wait(120):
            raise RuntimeError(f"pipelined: only {progress[0]} of {count} calls finished")
        return Sample(count, perf() - started, latencies, len(errors))

    def aio(self, count: int, in_flight: int) -> Sample:
        """``count`` calls through one :class:`AsyncRpcClient` (its own connection), from
        ``in_flight`` tasks each awaiting one call after another, on one event loop."""
        if self._aio_loop is None:
            self._aio_loop = asyncio.new_event_loop()
            self._aio = AsyncRpcClient("bench-aio", broker_url=self.url, timeout=30.0)
            self._aio_loop.run_until_complete(self._aio.connect())
        return self._aio_loop.run_until_complete(self._aio_calls(count, in_flight))

    async def _aio_calls(self, count: int, in_flight: int) -> Sample:
        call, service, payload = self._aio.call, self.service, self.payload
        return await from_tasks(count, in_flight, lambda: call(service, "echo", payload))

    def threads(self, count: int, threads: int) -> Sample:
        """``count`` sequential calls split over ``threads`` threads sharing the client."""
        latencies, errors = [], []
        call, service, payload = self.client.call, self.service, self.payload

        def caller(n: int) -> None:
            for _ in range(n):
                t0 = perf()
                try:
                    call(service, "echo", payload)
                except Exception as exc:  # noqa: BLE001 - counted in the figures
                    errors.append(exc)
                latencies.append(perf() - t0)

        workers = [threading.Thread(target=caller, args=(count // threads,)) for _ in range(threads)]
        started = perf()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return Sample(len(latencies), perf() - started, latencies, len(errors))

    def casts(self, count: int) -> Sample:
        """Confirmed persistent casts, timed until the worker handled (and acked) them all."""
        started = perf()
        sample = _one_at_a_time(count, self.client.cast, self.service, "touch", self.payload)
        self.casts_sent += count
        self.client.call(self.service, "casts_consumed", {"n": self.casts_sent}, timeout=60)
        sample.seconds = perf() - started
        return sample

    def calls(self, count: int) -> None:
        """Untimed load (for warm-up and the RSS scenario)."""
        sample = self.pipelined(count, 32, record=False)
        if sample.errors:
            raise RuntimeError(f"{sample.errors} of {count} calls failed")


def _one_at_a_time(count: int, send, service: str, action: str, payload: dict) -> Sample:
    """``count`` sends, each waited for, each one's latency recorded."""
    latencies = []
    started = perf()
    for _ in range(count):
        t0 = perf()
        send(service, action, payload)
        latencies.append(perf() - t0)
    return Sample(count, perf() - started, latencies)
