"""The request core of ``ferret serve`` (KServe's data plane): what every route, /v1 and /v2 alike, goes through.

One object admits a request (the cap on requests in progress, then the bearer token), reads its
body within the limits, splits it into named images, classifies them through the dynamic batcher
and turns every outcome into one counted answer; the routes (``v1.py``, ``v2.py``) hold it and only
translate their wire format, so both protocols share every limit, error and metric.

Limits (each bounds one resource; every inference answer and every error answer of any route,
unknown routes included, is counted in ``ferret_requests_total{code}``): request bodies accepted
and not yet answered hold at most ``max_inflight_mb`` (reserved as chunks arrive), so memory does
not scale with ``max_queue * max_body_mb``; a request must deliver its body within
``read_timeout`` after the headers (else 408). No body is parsed on the event loop: multipart and
v2 JSON bodies are parsed in one worker thread (the JSON part of a v2 request at most
``max_json_mb``, else 413), so probes answer while any request is parsed or refused.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import sys
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..batching import Closed, DynamicBatcher, Overloaded
from ..detector import Detector, Result
from ..fileio import sha256
from .form_parts import FormError, TooManyParts, file_parts
from .http_limits import OVER_CAPACITY, log

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

MB = 1024 * 1024


@dataclass
class ServeConfig:
    max_batch: int = 32
    max_delay_ms: float = 5.0
    max_queue: int = 256
    max_body_mb: float = 32.0
    retry_after_s: int = 1
    max_inflight_mb: float = 256.0
    max_parts: int = 64
    read_timeout: float = 10.0
    api_keys: tuple[str, ...] = ()
    metrics_public: bool = False
    model_name: str | None = None  # the v2 name (/v2/models/<name>); None: the model file's stem
    max_json_mb: float = 1.0  # the JSON part of a v2 request: json.loads holds the GIL, its objects take ~20x


class Metrics:
    """Prometheus metrics on a private registry (several apps in one process never collide)."""

    def __init__(self, batcher_depth: Callable[[], int], inflight_bytes: Callable[[], int]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("ferret_requests", "answers by code: inference, every error", ["code"],
                                registry=self.registry)
        self.images = Counter("ferret_images", "images classified", registry=self.registry)
        self.errors = Counter("ferret_errors", "requests answered with an error, by kind", ["kind"],
                              registry=self.registry)
        self.disconnects = Counter("ferret_client_disconnects", "clients gone before their request was read",
                                   registry=self.registry)
        self.closed = Counter("ferret_connections_closed", "connections closed without an answer, by reason "
                              "(header_timeout, tls_handshake, evicted)", ["reason"], registry=self.registry)
        self.batch = Histogram("ferret_batch_size", "images per backend batch", registry=self.registry,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.latency = Histogram("ferret_request_latency_seconds", "request latency, received to answered",
                                 registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.queue = Gauge("ferret_queue_depth", "requests waiting for a batch", registry=self.registry)
        self.queue.set_function(batcher_depth)
        self.inflight = Gauge("ferret_inflight_bytes", "request body bytes accepted and not yet answered",
                              registry=self.registry)
        self.inflight.set_function(inflight_bytes)

    def on_batch(self, size: int, _latencies: list[float]) -> None:
        self.batch.observe(size)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class ByteBudget:
    """Bytes of request bodies accepted and not yet answered, up to a limit; thread-safe."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._lock = threading.Lock()

    def reserve(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.limit:
                return False
            self.used += n
            return True

    def release(self, n: int) -> None:
        with self._lock:
            self.used -= n

    def reservation(self) -> Reservation:
        """An empty reservation for one request."""
        return Reservation(self)


class Reservation:
    """One request's share of a :class:`ByteBudget`: it grows as the body arrives and is given back
    whole, once, when the request is answered."""

    def __init__(self, budget: ByteBudget):
        self.budget, self.held = budget, 0

    def take(self, n: int) -> bool:
        """Reserve ``n`` more bytes; False, and nothing taken, when the budget cannot hold them."""
        if not self.budget.reserve(n):
            return False
        self.held += n
        return True

    def release(self) -> None:
        """Give every byte back (a second call gives back nothing)."""
        held, self.held = self.held, 0
        self.budget.release(held)


class Answer(Exception):
    """An error answer decided deep in a handler: status, metrics kind, message, headers."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers


class DataPlane:
    """One detector behind a dynamic batcher, with the limits, metrics and answers every route shares.

    The detector is owned: :meth:`start` runs the batcher (and warms the model up), :meth:`stop`
    drains it and closes the detector. The core, :meth:`classify_items`, takes named images and
    returns results or raises an :class:`Answer`; :meth:`answered` turns any outcome into one answer.
    """

    def __init__(self, detector: Detector, config: ServeConfig | None = None, *, warmup: bool = True):
        self.detector, self.cfg, self.warmup = detector, config or ServeConfig(), warmup
        self.ready = False
        self.batcher: DynamicBatcher | None = None
        self.max_body = int(self.cfg.max_body_mb * MB)
        self.budget = ByteBudget(int(self.cfg.max_inflight_mb * MB))
        self.metrics = Metrics(lambda: self.batcher.queue_depth if self.batcher else 0, lambda: self.budget.used)
        self._keys = [k.encode() for k in self.cfg.api_keys]
        self._retry = {"Retry-After": str(self.cfg.retry_after_s)}
        self.model_name = self.cfg.model_name or Path(detector.model_name).stem or "ferretnet"
        self.model_sha256: str | None = None  # read at startup, off the event loop
        self.max_json = int(self.cfg.max_json_mb * MB)
        # one thread parses bodies (multipart, v2 JSON): off the event loop, one parse's memory at a time
        self.parser = ThreadPoolExecutor(1, thread_name_prefix="ferret-parse")

    # ------------------------------------------------------------------------------ answers
    def count(self, status: int, kind: str) -> None:
        """Count an error answer (the protocol's own 400/431 too)."""
        self.metrics.errors.labels(kind).inc()
        self.metrics.requests.labels(str(status)).inc()

    def error(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> Response:
        from starlette.responses import JSONResponse

        self.count(status, kind)
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    def answer(self, a: Answer) -> Response:
        """The counted JSON response of an answer."""
        return self.error(a.status, a.kind, a.message, a.headers)

    def served(self, images: int, start: float) -> None:
        """Count a successful inference answer of ``images`` images, received at loop time ``start``."""
        self.metrics.images.inc(images)
        self.metrics.latency.observe(asyncio.get_running_loop().time() - start)
        self.metrics.requests.labels("200").inc()

    def authorized(self, request: Request) -> bool:
        """A valid bearer token, or no keys configured; every key compared in constant time."""
        if not self._keys:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode("latin-1", "replace")
        # compare against every key (no early exit): timing says nothing about which key nearly matched
        matches = [hmac.compare_digest(given, k) for k in self._keys]
        return scheme.lower() == "bearer" and any(matches)

    @staticmethod
    def unauthorized() -> Answer:
        return Answer(401, "unauthorized", "Received no valid bearer token; expected an Authorization: Bearer header "
                                           "with a key of this server", {"WWW-Authenticate": "Bearer"})

    # ------------------------------------------------------------------------------ reading a request
    def admit(self, request: Request) -> None:
        """The checks before a request's body is read: the cap on requests in progress, then the token."""
        if request.scope.get("state", {}).get(OVER_CAPACITY):
            raise Answer(503, "connections", "Received a request while the most requests are in progress; expected "
                                             "fewer at once (--max-connections, retry later)",
                         {**self._retry, "Connection": "close"})
        if not self.authorized(request):
            raise self.unauthorized()

    async def read_body(self, request: Request, reservation: Reservation) -> bytes:
        """The whole body within ``read_timeout`` (else 408), ``max_body`` (else 413) and the byte budget
        (else 503; taken into ``reservation`` as it arrives)."""
        try:
            return await asyncio.wait_for(self._read_body(request, reservation), self.cfg.read_timeout)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            raise Answer(408, "read_timeout", f"Received an incomplete body after {self.cfg.read_timeout:g} s; "
                                              "expected the whole body within that (--read-timeout)",
                         {"Connection": "close"}) from None

    async def _read_body(self, request: Request, reservation: Reservation) -> bytes:
        cfg, length = self.cfg, request.headers.get("content-length", "")
        if length.isascii() and length.isdigit() and len(length) < 19 and int(length) > self.max_body:
            raise Answer(413, "too_large", f"Received a body of {int(length)} bytes; expected at most "
                                           f"{cfg.max_body_mb:g} MB (--max-body-mb)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise Answer(413, "too_large", f"Received a body over {cfg.max_body_mb:g} MB; expected at most that "
                                               "(--max-body-mb)")
            if not reservation.take(len(chunk)):
                raise Answer(503, "inflight_bytes", f"Received a body while {self.budget.used} bytes of other "
                                                    f"requests are in flight; expected at most {cfg.max_inflight_mb:g}"
                                                    " MB in all (server overloaded, retry later)", self._retry)
            chunks.append(chunk)
        return b"".join(chunks)

    async def parts(self, request: Request, body: bytes) -> list[tuple[str, bytes]]:
        """(name, bytes) of each image: the raw body, or each multipart file part (parsed off the loop)."""
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            return [("<body>", body)]
        try:
            return await self.off_loop(file_parts, ctype, body, self.cfg.max_parts)
        except TooManyParts as e:
            raise Answer(413, "too_many_parts", str(e)) from None
        except FormError as e:
            raise Answer(400, "bad_request", str(e)) from None

    async def off_loop(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` in the parse thread: CPU-bound work on a body never blocks the loop."""
        return await asyncio.get_running_loop().run_in_executor(self.parser, functools.partial(fn, *args, **kwargs))

    # ------------------------------------------------------------------------------ the core
    async def classify_items(self, items: list[tuple[str, Any]]) -> list[Result]:
        """Results for named images, through the batcher; the answer (400, 503) when not all can be had."""
        if not items or items == [("<body>", b"")]:
            raise Answer(400, "bad_request", "Received no image; expected an image as the body or as multipart "
                                             "file parts")
        empty = [name for name, data in items if len(data) == 0]
        if empty:
            raise Answer(400, "bad_request", f"Received empty part(s) {', '.join(empty[:5])}"
                                             f"{' ...' if len(empty) > 5 else ''}; expected image bytes in every part")
        assert self.batcher is not None
        try:
            futures = self.batcher.submit_many(items)
        except Overloaded as e:
            raise Answer(503, "overloaded", str(e), self._retry) from None
        except Closed as e:
            raise Answer(503, "shutting_down", str(e), self._retry) from None
        del items
        results = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        bad = [r for r in results if r.error is not None]
        if bad:
            raise Answer(400, "bad_image", "; ".join(r.error for r in bad))
        return list(results)

    async def answered(self, request: Request, handle: Callable[[Reservation], Awaitable[Response]]) -> Response:
        """Run ``handle(reservation)`` and turn every outcome into one counted answer: an error status, a
        disconnect (one log line, no traceback), a shutdown timeout (503), a server fault (500)."""
        from starlette.requests import ClientDisconnect
        from starlette.responses import Response

        reservation = self.budget.reservation()  # the request's body bytes, given back once it is answered
        try:
            return await handle(reservation)
        except Answer as a:
            return self.answer(a)
        except ClientDisconnect:
            self.metrics.disconnects.inc()
            client = request.client
            log.info("[serve] client %s disconnected after %d bytes of its request", client and client.host,
                     reservation.held)
            return Response(status_code=499)  # never sent: uvicorn drops answers to a closed connection
        except asyncio.CancelledError:
            # uvicorn cancels requests still running when --shutdown-timeout expires: answer, do not 500
            return self.error(503, "shutting_down", "Received no result before the shutdown timeout; expected the "
                                                    "request to finish sooner (retry on another instance)", self._retry)
        except Exception:
            log.exception("[serve] unexpected error answering %s", request.url.path)
            return self.error(500, "internal",
                              "Received an unexpected server error; expected none (see the server log)")
        finally:
            reservation.release()

    # ------------------------------------------------------------------------------ start and stop
    async def start(self) -> None:
        """Run the batcher, warm the model up and read its digest (off the event loop); then ready."""
        cfg, loop = self.cfg, asyncio.get_running_loop()
        self.batcher = DynamicBatcher(self.detector, max_batch=cfg.max_batch, max_delay_ms=cfg.max_delay_ms,
                                      max_queue=cfg.max_queue, on_batch=self.metrics.on_batch)
        if self.warmup:
            await loop.run_in_executor(None, _warm_up, self.detector)
        path = getattr(self.detector.backend, "path", None)
        if path is not None and Path(str(path)).is_file():
            self.model_sha256 = await loop.run_in_executor(None, sha256, path)
        self.ready = True

    async def stop(self) -> None:
        """Not ready; drain the batcher, stop the parse thread, close the detector."""
        self.ready = False
        batcher = self.batcher
        assert batcher is not None
        await asyncio.get_running_loop().run_in_executor(None, batcher.close)
        self.parser.shutdown(wait=False, cancel_futures=True)
        self.detector.close()
        print(f"[serve] shut down after {batcher.stats.requests} images in {batcher.stats.batches} batches",
              file=sys.stderr, flush=True)


def _warm_up(detector: Detector) -> None:
    """Run one batch so the first request does not pay for lazy initialisation."""
    size = detector.preprocess.crop or 256
    detector.predict([np.zeros((size, size, 3), np.uint8)])
