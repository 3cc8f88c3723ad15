"""The KServe v2 routes of ``ferret serve`` (the Open Inference Protocol), over the request core.

So standard clients (``tritonclient.http``) work unchanged: ``GET /v2/health/live``,
``/v2/health/ready`` and ``/v2/models/<name>[/versions/1]/ready`` (open, for probes: 200 or 400,
empty body); ``GET /v2``, ``/v2/models/<name>`` (metadata, with the ``ferret.*`` parameters) and
``/v2/models/<name>/config`` (Triton's model configuration); ``POST /v2/models/<name>/infer``: JSON
or binary tensors. Inference goes through the same core as /v1/detect (``admit``, ``read_body``,
``classify_items``, ``answered``), so both share every limit, error (``{"error": ...}``) and metric.
The wire format is ``kserve.py``'s.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import __version__
from . import kserve
from .core import Answer, DataPlane, Reservation

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

V2_VERSION = "1"  # the one version of the one model a server holds


class V2Routes:
    """The v2 handlers; metadata from the core's detector, inference through the core."""

    def __init__(self, core: DataPlane):
        self.core = core

    def routes(self) -> list[Route]:
        from starlette.routing import Route

        routes = [Route("/v2", self.v2_server), Route("/v2/health/live", self.v2_live),
                  Route("/v2/health/ready", self.v2_ready)]
        for model in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            routes += [Route(model, self.v2_metadata), Route(model + "/ready", self.v2_model_ready),
                       Route(model + "/config", self.v2_config),
                       Route(model + "/infer", self.v2_infer, methods=["POST"])]
        return routes

    def v2_parameters(self) -> dict[str, str]:
        """The ``ferret.*`` parameters of the v2 model, in the form ``ferret export triton`` gives them.

        ``ferret.preprocess`` is the wire contract: uint8 NHWC pixels, cropped as the model's crop
        (the server normalises, as a graph exported with ``--preprocess`` would)."""
        det, info = self.core.detector, self.core.detector.backend.info
        pre = det.preprocess
        wire = {"crop": pre.crop, "mean": list(pre.mean), "std": list(pre.std), "layout": "NHWC", "dtype": "uint8"}
        params = {"ferret.preprocess": json.dumps(wire), "ferret.threshold": repr(float(det.threshold)),
                  "ferret.arch": str(info.arch), "ferret.lpd_func": str(info.lpd_func),
                  "ferret.window_size": str(info.window_size), "ferret.backend": det.backend.name,
                  "ferret.model_file": det.model_name, "ferret.max_pixels": str(det.max_pixels),
                  "ferret.toolkit_version": __version__}
        if self.core.model_sha256:
            params["ferret.model_sha256"] = self.core.model_sha256
        return params

    def v2_model_error(self, request: Request) -> Answer | None:
        """404 unless the URL names our model (and version 1, when it names one)."""
        name, version = request.path_params["model"], request.path_params.get("version")
        ours = self.core.model_name
        if name != ours or version not in (None, V2_VERSION):
            named = f"Received model {name!r}" + (f" version {version!r}" if version else "")
            return Answer(404, "unknown_model", f"{named}; expected {ours!r} (version {V2_VERSION})")
        return None

    def v2_guard(self, request: Request, model: bool = True) -> Response | None:
        """The (counted) answer for a metadata request that is not authorized or names another model."""
        a = None if self.core.authorized(request) else self.core.unauthorized()
        a = a or (self.v2_model_error(request) if model else None)
        return None if a is None else self.core.answer(a)

    async def v2_server(self, request: Request) -> Response:
        from starlette.responses import JSONResponse

        return self.v2_guard(request, model=False) or JSONResponse(kserve.server_metadata(__version__))

    async def v2_live(self, _: Request) -> Response:
        from starlette.responses import Response

        return Response(status_code=200)

    async def v2_ready(self, _: Request) -> Response:
        from starlette.responses import Response

        if not self.core.ready:
            self.core.count(400, "not_ready")
        return Response(status_code=200 if self.core.ready else 400)  # the protocol: 200 true, 4xx false, empty body

    async def v2_model_ready(self, request: Request) -> Response:
        from starlette.responses import Response

        known = self.v2_model_error(request) is None
        status = 200 if known and self.core.ready else (400 if known else 404)
        if status != 200:
            self.core.count(status, "not_ready" if known else "unknown_model")
        return Response(status_code=status)  # the protocol: an empty body

    async def v2_metadata(self, request: Request) -> Response:
        from starlette.responses import JSONResponse

        return self.v2_guard(request) or JSONResponse(kserve.model_metadata(self.core.model_name, V2_VERSION,
                                                                            self.v2_parameters()))

    async def v2_config(self, request: Request) -> Response:
        from starlette.responses import JSONResponse

        return self.v2_guard(request) or JSONResponse(kserve.model_config(self.core.model_name, self.core.cfg.max_parts,
                                                                          self.v2_parameters()))

    async def v2_infer(self, request: Request) -> Response:
        """POST /v2/models/<name>/infer: images in (encoded BYTES or UINT8 pixels), logits, prob_fake, labels out."""
        from starlette.responses import Response

        core = self.core

        async def handle(reservation: Reservation) -> Response:
            start = asyncio.get_running_loop().time()
            core.admit(request)
            wrong = self.v2_model_error(request)
            if wrong is not None:
                raise wrong
            if request.headers.get("content-encoding", "identity").lower() != "identity":
                raise Answer(415, "bad_request", f"Received Content-Encoding {request.headers['content-encoding']!r}; "
                                                 "expected identity (send the request uncompressed)")
            body = await core.read_body(request, reservation)
            req = await self.parse(request, body)
            del body  # pixels are views of it, kept alive by the arrays; encoded images are copies
            self.check_pixels(req.items)
            results = await core.classify_items(req.items)
            data, headers = kserve.encode_infer_response(core.model_name, V2_VERSION, req,
                                                         [r.logit for r in results], [r.prob_fake for r in results],
                                                         [r.label for r in results])
            core.served(len(results), start)
            return Response(data, headers=headers)

        return await core.answered(request, handle)

    async def parse(self, request: Request, body: bytes) -> kserve.InferRequest:
        """The decoded request, or the answer naming what is wrong (413, 400)."""
        core = self.core
        try:  # CPU-bound (json.loads, flattening tensor data): in the parse thread, off the event loop
            return await core.off_loop(kserve.parse_infer_request, body, request.headers.get(kserve.HEADER_LENGTH),
                                       max_images=core.cfg.max_parts, max_json=core.max_json)
        except kserve.ImagesOverLimit as e:
            raise Answer(413, "too_many_parts", str(e)) from None
        except kserve.JsonOverLimit as e:
            raise Answer(413, "too_large", str(e)) from None
        except kserve.ProtocolError as e:
            raise Answer(400, "bad_request", str(e)) from None

    def check_pixels(self, items: list[tuple[str, Any]]) -> None:
        """Decoded images obey --max-pixels as encoded ones do (those are checked from their header)."""
        limit = self.core.detector.max_pixels
        for name, item in items:
            if isinstance(item, np.ndarray) and limit is not None and item.shape[0] * item.shape[1] > limit:
                h, w = item.shape[:2]
                raise Answer(400, "bad_image", f"{name}: received an image of {w}x{h} = {w * h} pixels; expected at "
                                               f"most {limit} (--max-pixels)")
