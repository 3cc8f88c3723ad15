"""``ferret serve``: an HTTP service over the dynamic batcher (Starlette + uvicorn).

A package because one service speaks two protocols over one request core (KServe's layout):

- ``core.py``: the request core both protocols share: config, answers, metrics, admission, body
  reading, parts, classification;
- ``v2.py``: the KServe v2 routes (Open Inference Protocol), over the core;
- ``kserve.py``: the v2 codec: tensors, JSON and binary data, metadata, config (no web framework);
- ``form_parts.py``: the image parts of a multipart body, parsed off the event loop;
- ``http_limits.py``: the settings below the app (connections, TLS, tokens), checked before the model loads;
- ``http_protocol.py``: uvicorn's h11 protocol with those limits, connections counted from accept.
"""

from __future__ import annotations

from .core import DETECT_PATH, V2_VERSION, DetectApp, ServeConfig, ServerLimits, create_app, load_api_keys, serve

__all__ = ["DETECT_PATH", "V2_VERSION", "DetectApp", "ServeConfig", "ServerLimits", "create_app", "load_api_keys", "serve"]
