"""``ferret serve``: an HTTP service over the dynamic batcher (Starlette + uvicorn).

Endpoints:
- ``POST /v1/detect``: one image as the raw body, or several as ``multipart/form-data`` file parts.
  200 -> ``{"results": [{"path", "logit", "prob_fake", "label"}, ...]}`` (the ``ferret detect --json``
  rows, ``path`` being the part's file name or ``"<body>"``); 400 names a bad image; 413 when the
  body exceeds ``max_body_mb``; 503 with ``Retry-After`` when the queue is full.
- ``GET /healthz`` (the process is up), ``GET /readyz`` (model loaded and warmed up),
  ``GET /metrics`` (Prometheus text: requests, errors, batch sizes, latency, queue depth).

uvicorn turns SIGTERM into a graceful shutdown: it stops accepting connections, lets in-flight
requests finish, then the lifespan hook drains the batcher and closes the model; uvicorn then
re-raises the signal, so the exit status is the conventional "terminated by SIGTERM".
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from .batching import Closed, DynamicBatcher, Overloaded
from .detector import Detector

DETECT_PATH = "/v1/detect"


@dataclass
class ServeConfig:
    max_batch: int = 32
    max_delay_ms: float = 5.0
    max_queue: int = 256
    max_body_mb: float = 32.0
    retry_after_s: int = 1


class _Metrics:
    """Prometheus metrics on a private registry (several apps in one process never collide)."""

    def __init__(self, batcher_depth):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("ferret_requests", "HTTP detect requests by status code", ["code"], registry=self.registry)
        self.images = Counter("ferret_images", "images classified", registry=self.registry)
        self.errors = Counter("ferret_errors", "requests answered with an error, by kind", ["kind"], registry=self.registry)
        self.batch = Histogram("ferret_batch_size", "images per backend batch", registry=self.registry,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.latency = Histogram("ferret_request_latency_seconds", "request latency, received to answered",
                                 registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.queue = Gauge("ferret_queue_depth", "requests waiting for a batch", registry=self.registry)
        self.queue.set_function(batcher_depth)

    def on_batch(self, size: int, _latencies: list[float]) -> None:
        self.batch.observe(size)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def create_app(detector: Detector, config: ServeConfig | None = None, *, warmup: bool = True):
    """The ASGI app; the detector is owned (closed at shutdown)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    cfg = config or ServeConfig()
    state: dict[str, Any] = {"ready": False, "batcher": None, "metrics": None}
    max_body = int(cfg.max_body_mb * 1024 * 1024)

    def error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        state["metrics"].errors.labels(kind).inc()
        state["metrics"].requests.labels(str(status)).inc()
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    async def read_body(request: Request) -> bytes | None:
        """The body, or None once it exceeds max_body (announced or streamed)."""
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body:
            return None
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def parts(request: Request, body: bytes) -> list[tuple[str, bytes]]:
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            return [("<body>", body)]
        from starlette.datastructures import UploadFile

        # re-parse the already-read body (bounded above) with Starlette's multipart parser
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        form = await Request(request.scope, receive).form(max_files=1024, max_fields=1024, max_part_size=max_body)
        out = []
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                out.append((value.filename or key, await value.read()))
        return out

    async def detect(request: Request) -> Response:
        loop = asyncio.get_running_loop()
        start = loop.time()
        body = await read_body(request)
        if body is None:
            return error(413, "too_large", f"Received a body over {cfg.max_body_mb:g} MB; expected at most that "
                                           "(--max-body-mb)")
        try:
            items = await parts(request, body)
        except Exception as e:  # malformed multipart
            return error(400, "bad_request", f"Received a malformed multipart body ({e}); expected image file parts")
        if not items or all(len(data) == 0 for _, data in items):
            return error(400, "bad_request", "Received no image; expected an image as the body or as multipart file parts")
        batcher: DynamicBatcher = state["batcher"]
        try:
            futures = [batcher.submit(data, name) for name, data in items]
        except Overloaded as e:
            return error(503, "overloaded", str(e), {"Retry-After": str(cfg.retry_after_s)})
        except Closed as e:
            return error(503, "shutting_down", str(e), {"Retry-After": str(cfg.retry_after_s)})
        results = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        bad = [r for r in results if r.error is not None]
        if bad:
            return error(400, "bad_image", "; ".join(r.error for r in bad))
        state["metrics"].images.inc(len(results))
        state["metrics"].latency.observe(loop.time() - start)
        state["metrics"].requests.labels("200").inc()
        return JSONResponse({"results": [r.to_dict() for r in results]})

    async def healthz(_: Request) -> Response:
        return PlainTextResponse("ok")

    async def readyz(_: Request) -> Response:
        if state["ready"]:
            return PlainTextResponse("ready")
        return PlainTextResponse("warming up", status_code=503)

    async def metrics(_: Request) -> Response:
        data, ctype = state["metrics"].render()
        return Response(data, media_type=ctype)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        batcher = DynamicBatcher(detector, max_batch=cfg.max_batch, max_delay_ms=cfg.max_delay_ms,
                                 max_queue=cfg.max_queue)
        state["batcher"] = batcher
        state["metrics"] = m = _Metrics(lambda: batcher.queue_depth)
        batcher._on_batch = m.on_batch
        if warmup:
            await asyncio.get_running_loop().run_in_executor(None, _warm_up, detector)
        state["ready"] = True
        try:
            yield
        finally:
            state["ready"] = False
            await asyncio.get_running_loop().run_in_executor(None, batcher.close)
            detector.close()
            print(f"[serve] shut down after {batcher.stats.requests} images in {batcher.stats.batches} batches",
                  file=sys.stderr, flush=True)

    routes = [Route(DETECT_PATH, detect, methods=["POST"]), Route("/healthz", healthz), Route("/readyz", readyz),
              Route("/metrics", metrics)]
    return Starlette(routes=routes, lifespan=lifespan)


def _warm_up(detector: Detector) -> None:
    """Run one batch so the first request does not pay for lazy initialisation."""
    size = detector.preprocess.crop or 256
    detector.predict([np.zeros((size, size, 3), np.uint8)])


def serve(detector: Detector, host: str = "127.0.0.1", port: int = 8000, config: ServeConfig | None = None,
          log_level: str = "info", timeout_graceful_shutdown: float | None = 30.0) -> None:
    import uvicorn

    uvicorn.run(create_app(detector, config), host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=timeout_graceful_shutdown)
