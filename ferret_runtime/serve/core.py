"""``ferret serve``: an HTTP service over the dynamic batcher (Starlette + uvicorn).

Endpoints:
- ``POST /v1/detect``: one image as the raw body, or several as ``multipart/form-data`` file parts.
  200 -> ``{"results": [{"path", "logit", "prob_fake", "label"}, ...]}`` (the ``ferret detect --json``
  rows, ``path`` being the part's file name or ``"<body>"``); 400 names a bad image or an empty part;
  401 without a valid bearer token (when keys are set); 408 when the body is not in within the read
  timeout; 413 when the body exceeds ``max_body_mb`` or has more than ``max_parts`` parts; 503 with
  ``Retry-After`` when the queue, the in-flight byte budget or the cap on requests in progress is
  full; 500 (JSON, counted, one log line) for a server fault.
- ``GET /healthz`` (the process is up), ``GET /readyz`` (model loaded and warmed up): always open,
  for probes. ``GET /metrics`` (Prometheus text): needs the bearer token when keys are set, unless
  ``metrics_public``.
- The Open Inference Protocol (KServe v2; codec and tensors in ``kserve.py``), so standard clients
  (``tritonclient.http``) work unchanged: ``GET /v2/health/live``, ``/v2/health/ready`` and
  ``/v2/models/<name>[/versions/1]/ready`` (open, for probes: 200 or 400, empty body); ``GET /v2``,
  ``/v2/models/<name>`` (metadata, with the ``ferret.*`` parameters) and ``/v2/models/<name>/config``
  (Triton's model configuration); ``POST /v2/models/<name>/infer``: the same handler core, limits,
  errors (``{"error": ...}``) and metrics as /v1/detect, JSON or binary tensors (handlers in ``v2.py``).

Limits (each bounds one resource; every inference answer and every error answer of any route,
unknown routes included, is counted in ``ferret_requests_total{code}``): request bodies accepted
and not yet answered hold at most ``max_inflight_mb`` (reserved as chunks arrive), so memory does
not scale with ``max_queue * max_body_mb``; a detect request must deliver its body within
``read_timeout`` after the headers (else 408). No body is parsed on the event loop: multipart and
v2 JSON bodies are parsed in one worker thread (the JSON part of a v2 request at most
``max_json_mb``, else 413), so probes answer while any request is parsed or refused. Connections
(deadlines from accept, TLS, the cap on requests in progress, idle ones, lingering after a refusal)
are ``http_protocol.py``'s. uvicorn turns SIGTERM into a graceful shutdown: it stops accepting, lets
in-flight requests finish for at most ``shutdown_timeout`` (then answers the rest 503), then the
lifespan hook drains the batcher and closes the model; uvicorn re-raises the signal, so the exit
status is the conventional "terminated by SIGTERM".
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..batching import Closed, DynamicBatcher, Overloaded
from ..detector import Detector, Result
from ..fileio import sha256
from .form_parts import FormError, TooManyParts, file_parts
from .http_limits import OVER_CAPACITY, ByteBudget, ServerLimits, listen_socket, load_api_keys, log, tls_context
from .http_protocol import protocol_class
from .v2 import V2_VERSION, V2Routes

__all__ = ["DETECT_PATH", "V2_VERSION", "DetectApp", "ServeConfig", "ServerLimits", "create_app", "load_api_keys", "serve"]

DETECT_PATH = "/v1/detect"
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


class _Metrics:
    """Prometheus metrics on a private registry (several apps in one process never collide)."""

    def __init__(self, batcher_depth: Callable[[], int], inflight_bytes: Callable[[], int]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("ferret_requests", "answers by code: inference, every error", ["code"], registry=self.registry)
        self.images = Counter("ferret_images", "images classified", registry=self.registry)
        self.errors = Counter("ferret_errors", "requests answered with an error, by kind", ["kind"], registry=self.registry)
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


class _Answer(Exception):
    """An error answer decided deep in a handler: status, metrics kind, message, headers."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers


class DetectApp(V2Routes):
    """The service: one detector behind a dynamic batcher, its limits, metrics and handlers.

    ``asgi()`` builds the Starlette app (the detector is owned: closed at shutdown). The handler
    core, :meth:`classify_items`, takes named image bytes and returns results or raises an answer,
    so every route speaks the same limits, errors and metrics.
    """

    def __init__(self, detector: Detector, config: ServeConfig | None = None, *, warmup: bool = True):
        self.detector, self.cfg, self.warmup = detector, config or ServeConfig(), warmup
        self.ready = False
        self.batcher: DynamicBatcher | None = None
        self.max_body = int(self.cfg.max_body_mb * MB)
        self.budget = ByteBudget(int(self.cfg.max_inflight_mb * MB))
        self.metrics = _Metrics(lambda: self.batcher.queue_depth if self.batcher else 0, lambda: self.budget.used)
        self._keys = [k.encode() for k in self.cfg.api_keys]
        self._retry = {"Retry-After": str(self.cfg.retry_after_s)}
        self.model_name = self.cfg.model_name or Path(detector.model_name).stem or "ferretnet"
        self.model_sha256: str | None = None  # read at startup, off the event loop
        self.max_json = int(self.cfg.max_json_mb * MB)
        # one thread parses bodies (multipart, v2 JSON): off the event loop, one parse's memory at a time
        self.parser = ThreadPoolExecutor(1, thread_name_prefix="ferret-parse")

    def asgi(self) -> Any:
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.routing import Route

        routes = [Route(DETECT_PATH, self.detect, methods=["POST"]), Route("/healthz", self.healthz),
                  Route("/readyz", self.readyz), Route("/metrics", self.metrics_page),
                  Route("/v2", self.v2_server), Route("/v2/health/live", self.v2_live),
                  Route("/v2/health/ready", self.v2_ready)]
        for model in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            routes += [Route(model, self.v2_metadata), Route(model + "/ready", self.v2_model_ready),
                       Route(model + "/config", self.v2_config), Route(model + "/infer", self.v2_infer, methods=["POST"])]
        app = Starlette(routes=routes, lifespan=self.lifespan, exception_handlers={HTTPException: self.http_error})
        app.state.metrics = self.metrics
        return app

    # ------------------------------------------------------------------------------ answers
    def count(self, status: int, kind: str) -> None:
        """Count an error answer (the protocol's own 400/431 too)."""
        self.metrics.errors.labels(kind).inc()
        self.metrics.requests.labels(str(status)).inc()

    def error(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> Any:
        from starlette.responses import JSONResponse

        self.count(status, kind)
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    async def http_error(self, request: Any, exc: Any) -> Any:
        """Starlette's own 404 and 405, as JSON errors (v2 clients parse ``{"error": ...}``) and counted."""
        path = request.url.path if len(request.url.path) <= 200 else request.url.path[:200] + "..."
        if exc.status_code == 405:
            allowed = ", ".join(sorted((exc.headers or {}).get("Allow", "").split(", ")))
            return self.error(405, "method_not_allowed", f"Received {request.method} {path}; expected {allowed}",
                              exc.headers)
        if exc.status_code == 404:
            return self.error(404, "not_found", f"Received {request.method} {path}, not a route of this server; "
                                                f"expected {DETECT_PATH}, /healthz, /readyz, /metrics or /v2/...")
        return self.error(exc.status_code, "bad_request", str(exc.detail), exc.headers)

    def authorized(self, request: Any) -> bool:
        """A valid bearer token, or no keys configured; every key compared in constant time."""
        if not self._keys:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode("latin-1", "replace")
        # compare against every key (no early exit): timing says nothing about which key nearly matched
        matches = [hmac.compare_digest(given, k) for k in self._keys]
        return scheme.lower() == "bearer" and any(matches)

    @staticmethod
    def unauthorized() -> _Answer:
        return _Answer(401, "unauthorized", "Received no valid bearer token; expected an Authorization: Bearer header "
                                            "with a key of this server", {"WWW-Authenticate": "Bearer"})

    # ------------------------------------------------------------------------------ reading a request
    def admit(self, request: Any) -> None:
        """The checks before a request's body is read: the cap on requests in progress, then the token."""
        if request.scope.get("state", {}).get(OVER_CAPACITY):
            raise _Answer(503, "connections", "Received a request while the most requests are in progress; expected "
                                              "fewer at once (--max-connections, retry later)",
                          {**self._retry, "Connection": "close"})
        if not self.authorized(request):
            raise self.unauthorized()

    async def read_body(self, request: Any, held: list[int]) -> bytes:
        """The whole body within ``read_timeout`` (else 408), ``max_body`` (else 413) and the byte budget
        (else 503; reserved into ``held`` as it arrives)."""
        try:
            return await asyncio.wait_for(self._read_body(request, held), self.cfg.read_timeout)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            raise _Answer(408, "read_timeout", f"Received an incomplete body after {self.cfg.read_timeout:g} s; "
                                               "expected the whole body within that (--read-timeout)",
                          {"Connection": "close"}) from None

    async def _read_body(self, request: Any, held: list[int]) -> bytes:
        cfg, length = self.cfg, request.headers.get("content-length", "")
        if length.isascii() and length.isdigit() and len(length) < 19 and int(length) > self.max_body:
            raise _Answer(413, "too_large", f"Received a body of {int(length)} bytes; expected at most "
                                            f"{cfg.max_body_mb:g} MB (--max-body-mb)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise _Answer(413, "too_large", f"Received a body over {cfg.max_body_mb:g} MB; expected at most that "
                                                "(--max-body-mb)")
            if not self.budget.reserve(len(chunk)):
                raise _Answer(503, "inflight_bytes", f"Received a body while {self.budget.used} bytes of other "
                                                     f"requests are in flight; expected at most {cfg.max_inflight_mb:g}"
                                                     " MB in all (server overloaded, retry later)", self._retry)
            held[0] += len(chunk)
            chunks.append(chunk)
        return b"".join(chunks)

    async def parts(self, request: Any, body: bytes) -> list[tuple[str, bytes]]:
        """(name, bytes) of each image: the raw body, or each multipart file part (parsed off the loop)."""
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            return [("<body>", body)]
        try:
            return await self.off_loop(file_parts, ctype, body, self.cfg.max_parts)
        except TooManyParts as e:
            raise _Answer(413, "too_many_parts", str(e)) from None
        except FormError as e:
            raise _Answer(400, "bad_request", str(e)) from None

    async def off_loop(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` in the parse thread: CPU-bound work on a body never blocks the loop."""
        return await asyncio.get_running_loop().run_in_executor(self.parser, functools.partial(fn, *args, **kwargs))

    # ------------------------------------------------------------------------------ the core
    async def classify_items(self, items: list[tuple[str, Any]]) -> list[Result]:
        """Results for named images, through the batcher; the answer (400, 503) when not all can be had."""
        if not items or items == [("<body>", b"")]:
            raise _Answer(400, "bad_request", "Received no image; expected an image as the body or as multipart "
                                              "file parts")
        empty = [name for name, data in items if len(data) == 0]
        if empty:
            raise _Answer(400, "bad_request", f"Received empty part(s) {', '.join(empty[:5])}"
                                              f"{' ...' if len(empty) > 5 else ''}; expected image bytes in every part")
        assert self.batcher is not None
        try:
            futures = self.batcher.submit_many(items)
        except Overloaded as e:
            raise _Answer(503, "overloaded", str(e), self._retry) from None
        except Closed as e:
            raise _Answer(503, "shutting_down", str(e), self._retry) from None
        del items
        results = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        bad = [r for r in results if r.error is not None]
        if bad:
            raise _Answer(400, "bad_image", "; ".join(r.error for r in bad))
        return list(results)

    async def answered(self, request: Any, handle: Callable[[list[int]], Any]) -> Any:
        """Run ``handle(held)`` and turn every outcome into one counted answer: an error status, a
        disconnect (one log line, no traceback), a shutdown timeout (503), a server fault (500)."""
        from starlette.requests import ClientDisconnect
        from starlette.responses import Response

        held = [0]  # budget bytes this request reserved, released once it is answered
        try:
            return await handle(held)
        except _Answer as a:
            return self.error(a.status, a.kind, a.message, a.headers)
        except ClientDisconnect:
            self.metrics.disconnects.inc()
            client = request.client
            log.info("[serve] client %s disconnected after %d bytes of its request", client and client.host, held[0])
            return Response(status_code=499)  # never sent: uvicorn drops answers to a closed connection
        except asyncio.CancelledError:
            # uvicorn cancels requests still running when --shutdown-timeout expires: answer, do not 500
            return self.error(503, "shutting_down", "Received no result before the shutdown timeout; expected the "
                                                    "request to finish sooner (retry on another instance)", self._retry)
        except Exception:
            log.exception("[serve] unexpected error answering %s", request.url.path)
            return self.error(500, "internal", "Received an unexpected server error; expected none (see the server log)")
        finally:
            self.budget.release(held[0])

    # ------------------------------------------------------------------------------ routes
    async def detect(self, request: Any) -> Any:
        """POST /v1/detect: ``{"results": [rows]}``."""
        from starlette.responses import JSONResponse

        async def handle(held: list[int]) -> Any:
            start = asyncio.get_running_loop().time()
            self.admit(request)
            body = await self.read_body(request, held)
            items = await self.parts(request, body)
            del body  # the parts are copies: the joined body need not live while they wait for a batch
            results = await self.classify_items(items)
            self.metrics.images.inc(len(results))
            self.metrics.latency.observe(asyncio.get_running_loop().time() - start)
            self.metrics.requests.labels("200").inc()
            return JSONResponse({"results": [r.to_dict() for r in results]})

        return await self.answered(request, handle)

    async def healthz(self, _: Any) -> Any:
        from starlette.responses import PlainTextResponse

        return PlainTextResponse("ok")

    async def readyz(self, _: Any) -> Any:
        from starlette.responses import PlainTextResponse

        if not self.ready:
            self.count(503, "not_ready")
        return PlainTextResponse("ready") if self.ready else PlainTextResponse("warming up", status_code=503)

    async def metrics_page(self, request: Any) -> Any:
        from starlette.responses import Response

        if not self.cfg.metrics_public and not self.authorized(request):
            a = self.unauthorized()
            return self.error(a.status, a.kind, a.message, a.headers)
        data, ctype = self.metrics.render()
        return Response(data, media_type=ctype)

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Any):
        cfg, loop = self.cfg, asyncio.get_running_loop()
        self.batcher = batcher = DynamicBatcher(self.detector, max_batch=cfg.max_batch, max_delay_ms=cfg.max_delay_ms,
                                                max_queue=cfg.max_queue, on_batch=self.metrics.on_batch)
        if self.warmup:
            await loop.run_in_executor(None, _warm_up, self.detector)
        path = getattr(self.detector.backend, "path", None)
        if path is not None and Path(str(path)).is_file():
            self.model_sha256 = await loop.run_in_executor(None, sha256, path)
        self.ready = True
        try:
            yield
        finally:
            self.ready = False
            await loop.run_in_executor(None, batcher.close)
            self.parser.shutdown(wait=False, cancel_futures=True)
            self.detector.close()
            print(f"[serve] shut down after {batcher.stats.requests} images in {batcher.stats.batches} batches",
                  file=sys.stderr, flush=True)


def create_app(detector: Detector, config: ServeConfig | None = None, *, warmup: bool = True) -> Any:
    """The ASGI app of :class:`DetectApp`; the detector is owned (closed at shutdown)."""
    return DetectApp(detector, config, warmup=warmup).asgi()


def _warm_up(detector: Detector) -> None:
    """Run one batch so the first request does not pay for lazy initialisation."""
    size = detector.preprocess.crop or 256
    detector.predict([np.zeros((size, size, 3), np.uint8)])


def serve(detector: Detector, host: str = "127.0.0.1", port: int = 8000, config: ServeConfig | None = None,
          log_level: str = "info", limits: ServerLimits | None = None) -> None:
    """Run the app under uvicorn until SIGINT/SIGTERM.

    uvicorn gets a bound socket and no TLS settings: the protocol runs the handshake itself, so the
    header deadline and the connection count start at accept (and our start-up line names the scheme)."""
    import uvicorn

    cfg, lim = config or ServeConfig(), limits or ServerLimits()
    tls = tls_context(lim.ssl_certfile, lim.ssl_keyfile) if lim.ssl_certfile and lim.ssl_keyfile else None
    sock = listen_socket(host, port)
    app = DetectApp(detector, cfg)
    http = protocol_class(cfg.read_timeout, lim, tls, app.count, lambda reason: app.metrics.closed.labels(reason).inc())
    server = uvicorn.Server(uvicorn.Config(app.asgi(), log_level=log_level, http=http,
                                           timeout_keep_alive=lim.keep_alive_timeout,
                                           timeout_graceful_shutdown=lim.shutdown_timeout))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn raises SIGINT again once it has shut down
        pass
    if not server.started:
        sys.exit(3)  # uvicorn's start-up failure status: the lifespan (warm-up) failed
