"""A bandwidth-capped TCP proxy, to put a real server behind a slow link.

``ThrottledProxy(target_host, target_port, bytes_per_s)`` listens on a free
127.0.0.1 port and forwards every connection to the target, passing at most
``bytes_per_s`` per direction across all connections (one shared token
bucket per direction), plus an optional fixed ``delay_s`` per chunk of data
(64 KiB reads: a bulk transfer pays it many times) and an optional
``request_latency_s``: a delay for the first chunk a client sends after the
server last answered on that connection, i.e. once per request of a
request/response protocol (a Redis command, a pipeline, an HTTP request),
however large the answer. It runs its own event loop in a daemon thread;
``set_rate`` and the two attributes change it while it runs. Used by tests
and benchmarks to make a tier slow for real, instead of mocking its timings.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time


class _Bucket:
    def __init__(self, rate: float):
        self.rate = rate
        self._tokens = 0.0
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        async with self._lock:  # one shared link: senders queue for it
            now = time.monotonic()
            # burst allowance: 10 ms of traffic (at least one 64 KiB read), so short bursts
            # cannot beat the cap by much
            self._tokens = min(
                self._tokens + (now - self._stamp) * self.rate, max(self.rate * 0.01, 65536)
            )
            self._stamp = now
            self._tokens -= n
            if self._tokens < 0:
                await asyncio.sleep(-self._tokens / self.rate)


class ThrottledProxy:
    def __init__(
        self, target_host: str, target_port: int, bytes_per_s: float = 0, delay_s: float = 0.0
    ):
        self.target = (target_host, target_port)
        self.delay_s = delay_s
        self.request_latency_s = 0.0
        self._buckets = (_Bucket(bytes_per_s), _Bucket(bytes_per_s))
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        started = threading.Event()
        self._thread = threading.Thread(
            target=self._serve, args=(started,), daemon=True, name="throttle"
        )
        self._thread.start()
        started.wait(10)
        self.port: int = self._server.sockets[0].getsockname()[1]

    def set_rate(self, bytes_per_s: float) -> None:
        for b in self._buckets:
            b.rate = bytes_per_s

    def _serve(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0)
        )
        started.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        turn = {"answered": True}  # the server answered since the client last sent: a new request
        with contextlib.suppress(asyncio.CancelledError):  # the proxy is closing
            await asyncio.gather(
                self._pipe(reader, up_writer, self._buckets[0], turn, upstream=True),
                self._pipe(up_reader, writer, self._buckets[1], turn),
                return_exceptions=True,
            )

    async def _pipe(
        self, reader, writer, bucket: _Bucket, turn: dict, upstream: bool = False
    ) -> None:
        try:
            while data := await reader.read(64 * 1024):
                if upstream and turn["answered"] and self.request_latency_s:
                    await asyncio.sleep(self.request_latency_s)  # a new request
                turn["answered"] = not upstream
                await bucket.take(len(data))
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
