"""``ferret serve``'s own routes: /v1/detect, the probes and the metrics page, over the request core.

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
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from .core import DataPlane, Reservation

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

DETECT_PATH = "/v1/detect"


class V1Routes:
    """The /v1 handlers; every request goes through the shared ``core``."""

    def __init__(self, core: DataPlane):
        self.core = core

    def routes(self) -> list[Route]:
        from starlette.routing import Route

        return [Route(DETECT_PATH, self.detect, methods=["POST"]), Route("/healthz", self.healthz),
                Route("/readyz", self.readyz), Route("/metrics", self.metrics_page)]

    async def detect(self, request: Request) -> Response:
        """POST /v1/detect: ``{"results": [rows]}``."""
        from starlette.responses import JSONResponse

        core = self.core

        async def handle(reservation: Reservation) -> Response:
            start = asyncio.get_running_loop().time()
            core.admit(request)
            body = await core.read_body(request, reservation)
            items = await core.parts(request, body)
            del body  # the parts are copies: the joined body need not live while they wait for a batch
            results = await core.classify_items(items)
            core.served(len(results), start)
            return JSONResponse({"results": [r.to_dict() for r in results]})

        return await core.answered(request, handle)

    async def healthz(self, _: Request) -> Response:
        from starlette.responses import PlainTextResponse

        return PlainTextResponse("ok")

    async def readyz(self, _: Request) -> Response:
        from starlette.responses import PlainTextResponse

        if not self.core.ready:
            self.core.count(503, "not_ready")
        return PlainTextResponse("ready") if self.core.ready else PlainTextResponse("warming up", status_code=503)

    async def metrics_page(self, request: Request) -> Response:
        from starlette.responses import Response

        core = self.core
        if not core.cfg.metrics_public and not core.authorized(request):
            return core.answer(core.unauthorized())
        data, ctype = core.metrics.render()
        return Response(data, media_type=ctype)
