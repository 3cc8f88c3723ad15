"""The KServe v2 (Open Inference Protocol) routes of ``ferret serve``: a mixin of ``core.DetectApp``.

Metadata, config and probes here; inference through the app's own core (``admit``, ``read_body``,
``classify_items``, ``answered``), so v2 and /v1/detect share every limit, error and metric. The
wire format is ``kserve.py``'s.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np

from .. import __version__
from . import kserve

V2_VERSION = "1"  # the one version of the one model a server holds


def _answer() -> Any:
    from .core import _Answer  # serve imports this module: the answer type is looked up at call time

    return _Answer


class V2Routes:
    """The v2 handlers; the app provides detector, cfg, ready, model_name, model_sha256, metrics and
    the request core (authorized, unauthorized, admit, read_body, classify_items, answered)."""

    def v2_parameters(self) -> dict[str, str]:
        """The ``ferret.*`` parameters of the v2 model, in the form ``ferret export triton`` gives them.

        ``ferret.preprocess`` is the wire contract: uint8 NHWC pixels, cropped as the model's crop
        (the server normalises, as a graph exported with ``--preprocess`` would)."""
        det, info = self.detector, self.detector.backend.info
        pre = det.preprocess
        wire = {"crop": pre.crop, "mean": list(pre.mean), "std": list(pre.std), "layout": "NHWC", "dtype": "uint8"}
        params = {"ferret.preprocess": json.dumps(wire), "ferret.threshold": repr(float(det.threshold)),
                  "ferret.arch": str(info.arch), "ferret.lpd_func": str(info.lpd_func),
                  "ferret.window_size": str(info.window_size), "ferret.backend": det.backend.name,
                  "ferret.model_file": det.model_name, "ferret.max_pixels": str(det.max_pixels),
                  "ferret.toolkit_version": __version__}
        if self.model_sha256:
            params["ferret.model_sha256"] = self.model_sha256
        return params

    def v2_model_error(self, request: Any) -> Any:
        """404 unless the URL names our model (and version 1, when it names one)."""
        name, version = request.path_params["model"], request.path_params.get("version")
        if name != self.model_name or version not in (None, V2_VERSION):
            return _answer()(404, "unknown_model", f"Received model {name!r}" + (f" version {version!r}" if version else "")
                           + f"; expected {self.model_name!r} (version {V2_VERSION})")
        return None

    def v2_guard(self, request: Any, model: bool = True) -> Any:
        """The (counted) answer for a metadata request that is not authorized or names another model."""
        a = None if self.authorized(request) else self.unauthorized()
        a = a or (self.v2_model_error(request) if model else None)
        return None if a is None else self.error(a.status, a.kind, a.message, a.headers)

    async def v2_server(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        return self.v2_guard(request, model=False) or JSONResponse(kserve.server_metadata(__version__))

    async def v2_live(self, _: Any) -> Any:
        from starlette.responses import Response

        return Response(status_code=200)

    async def v2_ready(self, _: Any) -> Any:
        from starlette.responses import Response

        if not self.ready:
            self.count(400, "not_ready")
        return Response(status_code=200 if self.ready else 400)  # the protocol: 200 true, 4xx false, empty body

    async def v2_model_ready(self, request: Any) -> Any:
        from starlette.responses import Response

        known = self.v2_model_error(request) is None
        status = 200 if known and self.ready else (400 if known else 404)
        if status != 200:
            self.count(status, "not_ready" if known else "unknown_model")
        return Response(status_code=status)  # the protocol: an empty body

    async def v2_metadata(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        return self.v2_guard(request) or JSONResponse(kserve.model_metadata(self.model_name, V2_VERSION,
                                                                            self.v2_parameters()))

    async def v2_config(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        return self.v2_guard(request) or JSONResponse(kserve.model_config(self.model_name, self.cfg.max_parts,
                                                                          self.v2_parameters()))

    async def v2_infer(self, request: Any) -> Any:
        """POST /v2/models/<name>/infer: images in (encoded BYTES or UINT8 pixels), logits, prob_fake, labels out."""
        from starlette.responses import Response

        async def handle(held: list[int]) -> Any:
            start = asyncio.get_running_loop().time()
            self.admit(request)
            wrong = self.v2_model_error(request)
            if wrong is not None:
                raise wrong
            if request.headers.get("content-encoding", "identity").lower() != "identity":
                raise _answer()(415, "bad_request", f"Received Content-Encoding {request.headers['content-encoding']!r}; "
                                                  "expected identity (send the request uncompressed)")
            body = await self.read_body(request, held)
            try:  # CPU-bound (json.loads, flattening tensor data): in the parse thread, off the event loop
                req = await self.off_loop(kserve.parse_infer_request, body, request.headers.get(kserve.HEADER_LENGTH),
                                          max_images=self.cfg.max_parts, max_json=self.max_json)
            except kserve.ImagesOverLimit as e:
                raise _answer()(413, "too_many_parts", str(e)) from None
            except kserve.JsonOverLimit as e:
                raise _answer()(413, "too_large", str(e)) from None
            except kserve.ProtocolError as e:
                raise _answer()(400, "bad_request", str(e)) from None
            del body  # pixels are views of it, kept alive by the arrays; encoded images are copies
            self.check_pixels(req.items)
            results = await self.classify_items(req.items)
            data, headers = kserve.encode_infer_response(self.model_name, V2_VERSION, req,
                                                         [r.logit for r in results], [r.prob_fake for r in results],
                                                         [r.label for r in results])
            self.metrics.images.inc(len(results))
            self.metrics.latency.observe(asyncio.get_running_loop().time() - start)
            self.metrics.requests.labels("200").inc()
            return Response(data, headers=headers)

        return await self.answered(request, handle)

    def check_pixels(self, items: list[tuple[str, Any]]) -> None:
        """Decoded images obey --max-pixels as encoded ones do (those are checked from their header)."""
        limit = self.detector.max_pixels
        for name, item in items:
            if isinstance(item, np.ndarray) and limit is not None and item.shape[0] * item.shape[1] > limit:
                h, w = item.shape[:2]
                raise _answer()(400, "bad_image", f"{name}: received an image of {w}x{h} = {w * h} pixels; expected at "
                                                f"most {limit} (--max-pixels)")
