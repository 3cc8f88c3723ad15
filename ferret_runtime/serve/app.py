"""The ``ferret serve`` application: the request core and both protocols' routes in one Starlette app,
run by uvicorn over our own connection protocol.

Connections (deadlines from accept, TLS, the cap on requests in progress, idle ones, lingering after
a refusal) are ``http_protocol.py``'s. uvicorn turns SIGTERM into a graceful shutdown: it stops
accepting, lets in-flight requests finish for at most ``shutdown_timeout`` (then answers the rest
503), then the lifespan hook drains the batcher and closes the model; uvicorn re-raises the signal,
so the exit status is the conventional "terminated by SIGTERM".
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from ..detector import Detector
from .core import DataPlane, ServeConfig
from .http_limits import ServerLimits, listen_socket, tls_context
from .http_protocol import protocol_class
from .v1 import DETECT_PATH, V1Routes
from .v2 import V2Routes

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import Response


class DetectApp:
    """The service: one request core (:class:`DataPlane`, which owns the detector) behind the /v1 and
    the v2 routes; ``asgi()`` builds the Starlette app, whose lifespan starts and stops the core."""

    def __init__(self, detector: Detector, config: ServeConfig | None = None, *, warmup: bool = True):
        self.core = DataPlane(detector, config, warmup=warmup)
        self.v1, self.v2 = V1Routes(self.core), V2Routes(self.core)

    def asgi(self) -> Starlette:
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException

        app = Starlette(routes=self.v1.routes() + self.v2.routes(), lifespan=self.lifespan,
                        exception_handlers={HTTPException: self.http_error})
        app.state.metrics = self.core.metrics
        return app

    async def http_error(self, request: Request, exc: HTTPException) -> Response:
        """Starlette's own 404 and 405, as JSON errors (v2 clients parse ``{"error": ...}``) and counted."""
        path = request.url.path if len(request.url.path) <= 200 else request.url.path[:200] + "..."
        if exc.status_code == 405:
            allowed = ", ".join(sorted((exc.headers or {}).get("Allow", "").split(", ")))
            return self.core.error(405, "method_not_allowed", f"Received {request.method} {path}; expected {allowed}",
                                   exc.headers)
        if exc.status_code == 404:
            return self.core.error(404, "not_found", f"Received {request.method} {path}, not a route of this server; "
                                                     f"expected {DETECT_PATH}, /healthz, /readyz, /metrics or /v2/...")
        return self.core.error(exc.status_code, "bad_request", str(exc.detail), exc.headers)

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Any) -> AsyncIterator[None]:
        await self.core.start()
        try:
            yield
        finally:
            await self.core.stop()


def create_app(detector: Detector, config: ServeConfig | None = None, *, warmup: bool = True) -> Starlette:
    """The ASGI app of :class:`DetectApp`; the detector is owned (closed at shutdown)."""
    return DetectApp(detector, config, warmup=warmup).asgi()


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
    core = app.core
    http = protocol_class(cfg.read_timeout, lim, tls, core.count,
                          lambda reason: core.metrics.closed.labels(reason).inc())
    server = uvicorn.Server(uvicorn.Config(app.asgi(), log_level=log_level, http=http,
                                           timeout_keep_alive=lim.keep_alive_timeout,
                                           timeout_graceful_shutdown=lim.shutdown_timeout))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn raises SIGINT again once it has shut down
        pass
    if not server.started:
        sys.exit(3)  # uvicorn's start-up failure status: the lifespan (warm-up) failed
