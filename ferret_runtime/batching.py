"""Dynamic batching: single-image requests from many threads or coroutines, run as batches.

Requests wait in a bounded queue. A collector thread takes the first waiting request, then keeps
gathering until ``max_batch`` requests or ``max_delay_ms`` after the first, whichever comes first,
and hands the batch to the runner (decode on the detector's thread pool, then the backend). While a
batch runs, the next one is being gathered: at most ``in_flight`` batches are out at once (default:
the backend's slots, at least 2), so memory
is bounded by ``max_queue + in_flight * max_batch`` requests. A request that finds the queue full
fails at once with :class:`Overloaded` instead of growing memory.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from .detector import Detector, Result
from .errors import FerretError
from .preprocess import ImageInput


class Overloaded(FerretError):
    """The request queue is full; retry later."""


class Closed(FerretError):
    """The batcher is shut down and takes no new requests."""


@dataclass
class _Request:
    image: ImageInput
    name: str
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class BatchStats:
    """Counters a server exports; ``on_batch`` receives every batch's size and its requests' latencies."""

    batches: int = 0
    requests: int = 0


class DynamicBatcher:
    """Gathers requests into batches for one :class:`Detector`; thread-safe, asyncio-friendly."""

    def __init__(self, detector: Detector, *, max_batch: int = 32, max_delay_ms: float = 5.0, max_queue: int = 256,
                 in_flight: int | None = None, on_batch: Callable[[int, list[float]], None] | None = None):
        if in_flight is None:  # one batch per backend slot (CPU streams, GPU slots), and at least two:
            in_flight = max(2, detector.backend.slots)  # the next batch is gathered and decoded while one runs
        for name, value, low in (("max_batch", max_batch, 1), ("max_queue", max_queue, 1), ("in_flight", in_flight, 1)):
            if value < low:
                raise ValueError(f"Received {name}={value}; expected >= {low}")
        if max_delay_ms < 0:
            raise ValueError(f"Received max_delay_ms={max_delay_ms}; expected >= 0")
        self.detector = detector
        self.max_batch, self.max_delay = max_batch, max_delay_ms / 1000.0
        self._queue: queue.Queue[_Request | None] = queue.Queue(maxsize=max_queue)
        self._slots = threading.Semaphore(in_flight)
        self._runner = ThreadPoolExecutor(in_flight, thread_name_prefix="ferret-batch")
        self._on_batch = on_batch
        self._closed = False
        self._lock = threading.Lock()
        self.stats = BatchStats()
        self._collector = threading.Thread(target=self._collect, name="ferret-batcher", daemon=True)
        self._collector.start()

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def submit(self, image: ImageInput, name: str = "<input>") -> Future:
        """Queue one image; the future resolves to its :class:`Result` (``error`` set for a bad image).

        Raises Overloaded at once when the queue is full, Closed after :meth:`close`.
        """
        return self.submit_many([(name, image)])[0]

    def submit_many(self, items: list[tuple[str, ImageInput]]) -> list[Future]:
        """Queue (name, image) pairs all together or none of them: a request is never half queued.

        Raises Overloaded at once when they do not all fit, Closed after :meth:`close`.
        """
        with self._lock:  # producers hold the lock and the collector only takes: the free room can only grow
            if self._closed:
                raise Closed("Received a request after shutdown began; expected none")
            room = self._queue.maxsize - self._queue.qsize()
            if len(items) > room:
                raise Overloaded(f"Received a request of {len(items)} image(s) with {self._queue.qsize()} already "
                                 f"queued of {self._queue.maxsize}; expected fewer (server overloaded, retry later)")
            reqs = [_Request(image, name) for name, image in items]
            for req in reqs:
                self._queue.put_nowait(req)
        return [req.future for req in reqs]

    async def predict_async(self, image: ImageInput, name: str = "<input>") -> Result:
        return await asyncio.wrap_future(self.submit(image, name))

    def predict(self, image: ImageInput, name: str = "<input>", timeout: float | None = None) -> Result:
        return self.submit(image, name).result(timeout)

    # ------------------------------------------------------------------------------ worker side
    def _collect(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.perf_counter() + self.max_delay
            stop = False
            while len(batch) < self.max_batch:
                remaining = deadline - time.perf_counter()
                try:
                    item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._slots.acquire()  # at most in_flight batches out: gathering continues meanwhile
            self._runner.submit(self._run, batch)
            if stop:
                return

    def _run(self, batch: list[_Request]) -> None:
        try:
            outcomes = self.detector.run_chunk([(r.name, r.image) for r in batch])
        except BaseException as e:  # a backend failure fails this batch's requests, not the batcher
            for r in batch:
                r.future.set_exception(e)
            return
        finally:
            self._slots.release()
        now = time.perf_counter()
        self.stats.batches += 1
        self.stats.requests += len(batch)
        for r, (result, _) in zip(batch, outcomes):
            r.future.set_result(result)
        if self._on_batch is not None:
            self._on_batch(len(batch), [now - r.enqueued for r in batch])

    def close(self, drain: bool = True) -> None:
        """Stop taking requests; with ``drain`` finish every queued one, else fail them with Closed."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if not drain:
            while True:
                try:
                    req = self._queue.get_nowait()
                except queue.Empty:
                    break
                if req is not None:
                    req.future.set_exception(Closed("Received no result: the batcher shut down "
                                                    "before this request ran"))
        self._queue.put(None)  # after every queued request
        self._collector.join()
        self._runner.shutdown(wait=True)

    def __enter__(self) -> DynamicBatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
