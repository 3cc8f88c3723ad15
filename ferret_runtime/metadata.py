"""The ``metadata_props`` an exported model carries; written by ferret_export, read by the runtime."""

from __future__ import annotations

import json
from typing import Any

from .errors import ConfigError
from .preprocess import Preprocess

PREFIX = "ferret."
# key -> (python type, required)
KEYS: dict[str, tuple[type, bool]] = {
    "arch": (str, True),
    "lpd_func": (str, True),
    "window_size": (int, True),
    # "portable" (standard ops), "plugin" (one ferret::lpd node), "none" (origin), "external" (no LPD in the
    # graph: its input is the LPD residual, computed by the runtime)
    "lpd_mode": (str, True),
    "precision": (str, True),  # "fp32", "fp16", "int8"
    "preprocess": (dict, True),  # Preprocess.to_dict(); dtype/layout describe the graph's input
    "threshold": (float, True),
    "toolkit_version": (str, True),
    "provenance": (dict, False),  # checkpoint path and sha256, training config
}


def encode(values: dict[str, Any]) -> dict[str, str]:
    """Typed values -> ``ferret.*`` string props (dicts as JSON)."""
    out = {}
    for key, (typ, required) in KEYS.items():
        if key not in values:
            if required:
                raise ConfigError(f"metadata: missing required key {key!r}")
            continue
        v = values[key]
        out[PREFIX + key] = json.dumps(v, sort_keys=True) if typ is dict else str(v)
    return out


def decode(props: dict[str, str], source: str) -> dict[str, Any]:
    """``ferret.*`` string props -> typed values; a model without them is not one of ours."""
    ours = {k[len(PREFIX):]: v for k, v in props.items() if k.startswith(PREFIX)}
    missing = [k for k, (_, req) in KEYS.items() if req and k not in ours]
    if missing:
        raise ConfigError(
            f"{source}: received a model without FerretNet metadata (missing {', '.join(PREFIX + k for k in missing)}); "
            "expected a model exported by 'ferret export onnx'"
        )
    out: dict[str, Any] = {}
    for key, raw in ours.items():
        if key not in KEYS:
            continue  # newer toolkits may add keys
        typ = KEYS[key][0]
        try:
            out[key] = json.loads(raw) if typ is dict else typ(raw)
        except (ValueError, TypeError):
            raise ConfigError(f"{source}: metadata {PREFIX + key}={raw!r} is not a valid {typ.__name__}") from None
    out["preprocess"] = Preprocess.from_dict(out["preprocess"])
    return out
