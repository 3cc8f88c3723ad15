"""``ferret serve``: an HTTP service over the dynamic batcher (Starlette + uvicorn).

A package because one service speaks two protocols over one request core, in KServe's layout
(``protocol/dataplane.py``, ``rest/v1_endpoints.py``, ``rest/v2_endpoints.py``, ``infer_type.py``).
A request goes: ``http_protocol.py`` (the connection) -> a route of ``v1.py`` or ``v2.py`` -> the
core in ``core.py`` -> the dynamic batcher and the detector.

- ``app.py``: the Starlette app (routes, JSON 404/405, start and stop) and :func:`serve`, which runs it;
- ``core.py``: the request core both protocols share: config, answers, metrics, admission, body
  reading, image parts, classification;
- ``v1.py``: ``POST /v1/detect``, the probes and ``/metrics``;
- ``v2.py``: the KServe v2 routes (Open Inference Protocol), for standard clients such as tritonclient;
- ``kserve.py``: the v2 codec: tensors, JSON and binary data, metadata, config (no web framework);
- ``form_parts.py``: the image parts of a multipart body (run in the parse thread, off the event loop);
- ``http_limits.py``: the settings below the app (connections, TLS, tokens), checked before the model loads;
- ``http_protocol.py``: uvicorn's h11 protocol with those limits, connections counted from accept.

No route module imports another; each receives the core it shares.
"""

from __future__ import annotations

from .app import DetectApp, create_app, serve
from .core import DataPlane, ServeConfig
from .http_limits import ServerLimits, load_api_keys
from .v1 import DETECT_PATH
from .v2 import V2_VERSION

__all__ = ["DETECT_PATH", "V2_VERSION", "DataPlane", "DetectApp", "ServeConfig", "ServerLimits", "create_app",
           "load_api_keys", "serve"]
