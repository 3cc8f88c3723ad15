"""``ferret serve``: an HTTP service over the dynamic batcher (Starlette + uvicorn).

Endpoints:
- ``POST /v1/detect``: one image as the raw body, or several as ``multipart/form-data`` file parts.
  200 -> ``{"results": [{"path", "logit", "prob_fake", "label"}, ...]}`` (the ``ferret detect --json``
  rows, ``path`` being the part's file name or ``"<body>"``); 400 names a bad image or an empty part;
  401 without a valid bearer token (when keys are set); 408 when the body is not in within the read
  timeout; 413 when the body exceeds ``max_body_mb`` or has more than ``max_parts`` parts; 503 with
  ``Retry-After`` when the queue, the in-flight byte budget or the connection cap is full; 500 (JSON,
  counted, one log line) for a server fault.
- ``GET /healthz`` (the process is up), ``GET /readyz`` (model loaded and warmed up): always open,
  for probes. ``GET /metrics`` (Prometheus text): needs the bearer token when keys are set, unless
  ``metrics_public``.

Limits (each bounds one resource; every answer is counted in ``ferret_requests_total{code}``):
request bodies accepted and not yet answered hold at most ``max_inflight_mb`` (reserved as chunks
arrive), so memory does not scale with ``max_queue * max_body_mb``; a connection must deliver its
request headers within ``read_timeout`` (else it is closed; uvicorn itself has no such deadline) and
a detect request its body within ``read_timeout`` after the headers (else 408); requests on
connections past ``max_connections`` get 503. uvicorn turns SIGTERM into a graceful shutdown: it
stops accepting, lets in-flight requests finish for at most ``shutdown_timeout`` (then answers the
rest 503), then the lifespan hook drains the batcher and closes the model; uvicorn re-raises the
signal, so the exit status is the conventional "terminated by SIGTERM".
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .batching import Closed, DynamicBatcher, Overloaded
from .detector import Detector
from .errors import ConfigError

DETECT_PATH = "/v1/detect"
MB = 1024 * 1024
log = logging.getLogger("uvicorn.error")  # uvicorn configures its handler and level


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


@dataclass
class ServerLimits:
    """Connection-level settings handed to uvicorn and to the protocol below."""

    max_connections: int = 256
    keep_alive_timeout: float = 5.0
    shutdown_timeout: float = 20.0
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None


def load_api_keys(path: str | Path) -> tuple[str, ...]:
    """Bearer tokens from a file, one per line; ConfigError when it is unreadable or holds none."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"Received --api-key-file {path}: cannot read it ({e.__class__.__name__}); "
                          "expected a readable text file of tokens, one per line") from None
    keys = tuple(line.strip() for line in lines if line.strip())
    if not keys:
        raise ConfigError(f"Received --api-key-file {path} with no token; expected one or more, one per line")
    if not all(k.isascii() for k in keys):
        raise ConfigError(f"Received --api-key-file {path} with a non-ASCII token; expected ASCII tokens")
    return keys


class _ByteBudget:
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


class _Metrics:
    """Prometheus metrics on a private registry (several apps in one process never collide)."""

    def __init__(self, batcher_depth: Callable[[], int], inflight_bytes: Callable[[], int]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("ferret_requests", "HTTP detect requests by status code", ["code"], registry=self.registry)
        self.images = Counter("ferret_images", "images classified", registry=self.registry)
        self.errors = Counter("ferret_errors", "requests answered with an error, by kind", ["kind"], registry=self.registry)
        self.disconnects = Counter("ferret_client_disconnects", "clients gone before their request was read",
                                   registry=self.registry)
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


OVER_CAPACITY = "ferret_over_capacity"  # set in the request state by the protocol for connections past the cap


def create_app(detector: Detector, config: ServeConfig | None = None, *, warmup: bool = True):
    """The ASGI app; the detector is owned (closed at shutdown)."""
    from starlette.applications import Starlette
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    cfg = config or ServeConfig()
    state: dict[str, Any] = {"ready": False, "batcher": None}
    max_body = int(cfg.max_body_mb * MB)
    budget = _ByteBudget(int(cfg.max_inflight_mb * MB))
    metrics = _Metrics(lambda: state["batcher"].queue_depth if state["batcher"] else 0, lambda: budget.used)
    keys = [k.encode() for k in cfg.api_keys]
    retry = {"Retry-After": str(cfg.retry_after_s)}

    def error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        metrics.errors.labels(kind).inc()
        metrics.requests.labels(str(status)).inc()
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    def authorized(request: Request) -> bool:
        """A valid bearer token, or no keys configured; every key compared in constant time."""
        if not keys:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode("latin-1", "replace")
        # compare against every key (no early exit): timing says nothing about which key nearly matched
        matches = [hmac.compare_digest(given, k) for k in keys]
        return scheme.lower() == "bearer" and any(matches)

    def unauthorized() -> _Answer:
        return _Answer(401, "unauthorized", "Received no valid bearer token; expected an Authorization: Bearer header "
                                            "with a key of this server", {"WWW-Authenticate": "Bearer"})

    async def read_body(request: Request, held: list[int]) -> bytes:
        """The body within max_body and the byte budget (reserved into ``held`` as it arrives)."""
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body:
            raise _Answer(413, "too_large", f"Received a body of {int(length)} bytes; expected at most "
                                            f"{cfg.max_body_mb:g} MB (--max-body-mb)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                raise _Answer(413, "too_large", f"Received a body over {cfg.max_body_mb:g} MB; expected at most that "
                                                "(--max-body-mb)")
            if not budget.reserve(len(chunk)):
                raise _Answer(503, "inflight_bytes", f"Received a body while {budget.used} bytes of other requests "
                                                     f"are in flight; expected at most {cfg.max_inflight_mb:g} MB in "
                                                     "all (server overloaded, retry later)", retry)
            held[0] += len(chunk)
            chunks.append(chunk)
        return b"".join(chunks)

    async def parts(request: Request, body: bytes) -> list[tuple[str, bytes]]:
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            return [("<body>", body)]

        # re-parse the already-read body (bounded above) with Starlette's multipart parser
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        # without "app" in the scope Starlette raises its parser's MultiPartException, not a ready-made 400
        scope = {k: v for k, v in request.scope.items() if k != "app"}
        try:
            form = await Request(scope, receive).form(max_files=cfg.max_parts, max_fields=cfg.max_parts,
                                                              max_part_size=max_body)
        except MultiPartException as e:
            if str(e).startswith("Too many"):
                raise _Answer(413, "too_many_parts", f"Received more than {cfg.max_parts} multipart parts; expected "
                                                     f"at most {cfg.max_parts} (--max-parts)") from None
            raise _Answer(400, "bad_request", f"Received a malformed multipart body ({e}); expected image file "
                                              "parts") from None
        try:
            out = []
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    out.append((value.filename or key, await value.read()))
            return out
        finally:
            await form.close()  # large parts spill to temporary files: remove them now, not at garbage collection

    async def classify(request: Request, held: list[int]) -> Response:
        loop = asyncio.get_running_loop()
        start = loop.time()
        if request.scope.get("state", {}).get(OVER_CAPACITY):
            raise _Answer(503, "connections", "Received a request on a connection past the connection cap; expected "
                                              "fewer open connections (--max-connections, retry later)",
                          {**retry, "Connection": "close"})
        if not authorized(request):
            raise unauthorized()
        try:
            body = await asyncio.wait_for(read_body(request, held), cfg.read_timeout)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            raise _Answer(408, "read_timeout", f"Received an incomplete body after {cfg.read_timeout:g} s; expected "
                                               "the whole body within that (--read-timeout)",
                          {"Connection": "close"}) from None
        items = await parts(request, body)
        del body  # the parts are copies: the joined body need not live while they wait for a batch
        if not items or items == [("<body>", b"")]:
            raise _Answer(400, "bad_request", "Received no image; expected an image as the body or as multipart "
                                              "file parts")
        empty = [name for name, data in items if not data]
        if empty:
            raise _Answer(400, "bad_request", f"Received empty part(s) {', '.join(empty[:5])}"
                                              f"{' ...' if len(empty) > 5 else ''}; expected image bytes in every part")
        batcher: DynamicBatcher = state["batcher"]
        try:
            futures = batcher.submit_many(items)
        except Overloaded as e:
            raise _Answer(503, "overloaded", str(e), retry) from None
        except Closed as e:
            raise _Answer(503, "shutting_down", str(e), retry) from None
        del items
        results = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        bad = [r for r in results if r.error is not None]
        if bad:
            raise _Answer(400, "bad_image", "; ".join(r.error for r in bad))
        metrics.images.inc(len(results))
        metrics.latency.observe(loop.time() - start)
        metrics.requests.labels("200").inc()
        return JSONResponse({"results": [r.to_dict() for r in results]})

    async def detect(request: Request) -> Response:
        held = [0]  # budget bytes this request reserved, released once it is answered
        try:
            return await classify(request, held)
        except _Answer as a:
            return error(a.status, a.kind, a.message, a.headers)
        except ClientDisconnect:
            metrics.disconnects.inc()
            client = request.client
            log.info("[serve] client %s disconnected after %d bytes of its request", client and client.host, held[0])
            return Response(status_code=499)  # never sent: uvicorn drops answers to a closed connection
        except asyncio.CancelledError:
            # uvicorn cancels requests still running when --shutdown-timeout expires: answer, do not 500
            return error(503, "shutting_down", "Received no result before the shutdown timeout; expected the "
                                               "request to finish sooner (retry on another instance)", retry)
        except Exception:
            log.exception("[serve] unexpected error answering %s", DETECT_PATH)
            return error(500, "internal", "Received an unexpected server error; expected none (see the server log)")
        finally:
            budget.release(held[0])

    async def healthz(_: Request) -> Response:
        return PlainTextResponse("ok")

    async def readyz(_: Request) -> Response:
        if state["ready"]:
            return PlainTextResponse("ready")
        return PlainTextResponse("warming up", status_code=503)

    async def metrics_page(request: Request) -> Response:
        if not cfg.metrics_public and not authorized(request):
            a = unauthorized()
            return JSONResponse({"error": a.message}, status_code=401, headers=a.headers)
        data, ctype = metrics.render()
        return Response(data, media_type=ctype)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        batcher = DynamicBatcher(detector, max_batch=cfg.max_batch, max_delay_ms=cfg.max_delay_ms,
                                 max_queue=cfg.max_queue, on_batch=metrics.on_batch)
        state["batcher"] = batcher
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
              Route("/metrics", metrics_page)]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.metrics = metrics
    return app


def _warm_up(detector: Detector) -> None:
    """Run one batch so the first request does not pay for lazy initialisation."""
    size = detector.preprocess.crop or 256
    detector.predict([np.zeros((size, size, 3), np.uint8)])


def protocol_class(read_timeout: float, max_connections: int) -> type:
    """uvicorn's h11 protocol plus a header deadline and a connection cap, which uvicorn lacks.

    A connection must deliver a complete request head within ``read_timeout`` of opening (or of the
    first byte of its next request); else it is closed. A body left unread after the answer (a 401,
    a 413) must also finish within ``read_timeout``. Requests on connections opened past
    ``max_connections`` reach the app marked :data:`OVER_CAPACITY` (answered 503 and counted there,
    the probes still served), so the cap costs no request parsing of our own.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class DeadlineH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                self.app_state = {**self.app_state, OVER_CAPACITY: True}
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._deadline is None and self.conn.their_state is h11.IDLE:
                self._arm()  # the first bytes of the next request on a kept-alive connection
            super().data_received(data)
            self._update()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._update()

        def _reading_leftover(self) -> bool:
            """Answered, but the client is still sending that request's body (uvicorn discards it)."""
            return self.conn.their_state is h11.SEND_BODY and (self.cycle is None or self.cycle.response_complete)

        def _update(self) -> None:
            state = self.conn.their_state
            if state is h11.IDLE:
                return  # head still coming (deadline armed) or an idle keep-alive (uvicorn's own timer)
            if self._reading_leftover():
                if self._deadline is None:
                    self._arm()
            else:
                self._disarm()  # head complete: the app reads the body under its own deadline

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(read_timeout, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if (self.conn.their_state is h11.IDLE or self._reading_leftover()) and not self.transport.is_closing():
                log.info("[serve] closed a connection from %s: no complete request within %g s (--read-timeout)",
                         self.client and self.client[0], read_timeout)
                self.transport.close()

    return DeadlineH11Protocol


def serve(detector: Detector, host: str = "127.0.0.1", port: int = 8000, config: ServeConfig | None = None,
          log_level: str = "info", limits: ServerLimits | None = None) -> None:
    """Run the app under uvicorn until SIGINT/SIGTERM."""
    import uvicorn

    cfg, lim = config or ServeConfig(), limits or ServerLimits()
    uvicorn.run(create_app(detector, cfg), host=host, port=port, log_level=log_level,
                http=protocol_class(cfg.read_timeout, lim.max_connections),
                timeout_keep_alive=lim.keep_alive_timeout, timeout_graceful_shutdown=lim.shutdown_timeout,
                ssl_certfile=lim.ssl_certfile, ssl_keyfile=lim.ssl_keyfile)
