"""The ``metadata_props`` an exported model carries; written by ferret_export, read by the runtime.

A model file can lie: its metadata is checked for range here, and against what the graph itself
declares (one logit per image, weights the size of the named architecture) by the backends, with
the helpers below, so a wrong file is refused by name instead of served.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .lpd_spec import LPD_FUNCS, WINDOW_SIZES
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
LPD_MODES: tuple[str, ...] = ("portable", "plugin", "none", "external")
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class ArchShape:
    """A named FerretNet's shape and its parameter count in PyTorch (BatchNorm not folded)."""

    dim: int
    depths: tuple[int, ...]
    params: int


# The named architectures; ferret_train registers its models from this table, so a name always
# means one shape. The paper's FerretNet (1.06M parameters) is FerretNet-B.
ARCHS: dict[str, ArchShape] = {
    "ferretnet-s": ArchShape(dim=32, depths=(2, 2), params=126_289),
    "ferretnet-b": ArchShape(dim=96, depths=(2, 2), params=1_057_777),
}
# An exported graph holds a few values more or fewer than the PyTorch model (BatchNorm folded into
# convolution biases, LPD constants, INT8 scales and zero points: -1% to +3% for S and B); the two
# named sizes are 8x apart, so 10% never confuses them.
ARCH_SIZE_TOLERANCE = 0.10


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
    """``ferret.*`` string props -> typed, range-checked values; a model without them is not one of ours."""
    ours = {k[len(PREFIX):]: v for k, v in props.items() if k.startswith(PREFIX)}
    missing = [k for k, (_, req) in KEYS.items() if req and k not in ours]
    if missing:
        raise ConfigError(
            f"{source}: received a model without FerretNet metadata "
            f"(missing {', '.join(PREFIX + k for k in missing)}); expected a model exported by 'ferret export onnx'"
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
        if typ is dict and not isinstance(out[key], dict):
            raise ConfigError(f"{source}: metadata {PREFIX + key}={raw!r} is not a valid JSON object")
    _check_values(out, source)
    scaling_of(out, source)  # a calibration that would reverse the ranking is refused on load
    out["preprocess"] = preprocess_from(out["preprocess"], source, f"metadata {PREFIX}preprocess")
    return out


def _check_values(meta: dict[str, Any], source: str) -> None:
    """Refuse values no exporter writes, naming the file and the key."""
    allowed: dict[str, Sequence[Any]] = {"lpd_func": LPD_FUNCS, "window_size": WINDOW_SIZES, "lpd_mode": LPD_MODES,
                                         "precision": PRECISIONS}
    for key, choices in allowed.items():
        if meta[key] not in choices:
            raise ConfigError(f"{source}: received metadata {PREFIX}{key}={meta[key]!r}; "
                              f"expected one of {', '.join(map(str, choices))}")
    if not math.isfinite(meta["threshold"]) or not 0.0 <= meta["threshold"] <= 1.0:
        raise ConfigError(f"{source}: received metadata {PREFIX}threshold={meta['threshold']!r}; "
                          "expected a probability in [0, 1]")
    if not meta["arch"]:
        raise ConfigError(f"{source}: received an empty metadata {PREFIX}arch; expected an architecture name "
                          f"such as {', '.join(ARCHS)}")


def preprocess_from(d: Any, source: str, what: str = "preprocess") -> Preprocess:
    """``Preprocess.from_dict`` whose errors name the file: "x.pth: received preprocess crop -3; ..."."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: received {what} {d!r}; expected a dict of preprocessing settings")
    try:
        return Preprocess.from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{source}: {_lower_first(str(e))}") from None
    except (TypeError, ValueError) as e:  # e.g. a mean that is not numbers
        raise ConfigError(f"{source}: received {what} {d!r}; expected valid preprocessing settings ({e})") from None


def _lower_first(message: str) -> str:
    """'Received crop -3; ...' -> 'received crop -3; ...', to follow 'file: '."""
    return message[:1].lower() + message[1:] if message.startswith("Received") else message


def check_logit_output(shapes: Sequence[Sequence[Any] | None], source: str) -> None:
    """Exactly one output of shape [N] or [N, 1]: one logit per image (a symbolic N is fine).

    Anything else would be served wrong: the runtime reads one value per image, so a graph with
    several outputs, or several values per image, has no single logit to read.
    """
    if len(shapes) != 1:
        raise ConfigError(f"{source}: received a model with {len(shapes)} outputs; expected one output, "
                          "one logit per image ([N] or [N, 1])")
    shape = shapes[0]
    if shape is None or len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        got = "an unknown shape" if shape is None else f"shape {list(shape)}"
        raise ConfigError(f"{source}: received an output of {got}; expected one logit per image ([N] or [N, 1])")


def check_arch_size(arch: str, weights: int, source: str) -> None:
    """The values a graph's weights hold must be the size of the architecture its metadata names.

    Names outside ``ARCHS`` (e.g. ``ferretnet-custom-d64``) promise no size and pass.
    """
    if arch not in ARCHS:
        return
    want = ARCHS[arch].params
    if abs(weights - want) <= ARCH_SIZE_TOLERANCE * want:
        return
    nearest = min(ARCHS, key=lambda a: abs(math.log(max(weights, 1) / ARCHS[a].params)))
    like = f", the size of {nearest} ({ARCHS[nearest].params:,})" if \
        abs(weights - ARCHS[nearest].params) <= ARCH_SIZE_TOLERANCE * ARCHS[nearest].params else ""
    raise ConfigError(f"{source}: metadata {PREFIX}arch says {arch} ({want:,} parameters); the graph's weights "
                      f"hold {weights:,} values{like}; expected metadata that matches the weights")


# ------------------------------------------------------------------------------------ calibration
# ``ferret calibrate`` records what it fitted in the model's provenance, under this key:
#   {"scaling": {"method": "temperature", "temperature": T} | {"method": "platt", "a": A, "b": B}
#               | {"method": "none"},
#    "threshold": t, "rule": "fpr"|"accuracy"|"eer", "target_fpr": q, "threshold_ci": [lo, hi],
#    "data": {"path", "n_real", "n_fake", "sha256"}, ...}
# The runtime reports prob_fake = sigmoid(scaled logit) and labels "fake" when prob_fake > threshold
# (the model's ferret.threshold, equal to the record's); the raw logit stays the model's. It lives in
# the provenance because every backend already carries that dict into ModelInfo.extra.
CALIBRATION_KEY = "calibration"
SCALING_METHODS: tuple[str, ...] = ("none", "temperature", "platt")


@dataclass(frozen=True)
class Scaling:
    """A monotone map of the model's logit before the sigmoid: T > 0 (temperature) or a > 0 (Platt)."""

    method: str = "none"
    temperature: float = 1.0
    a: float = 1.0
    b: float = 0.0

    def apply(self, logit: Any) -> Any:
        """The calibrated logit (float or ndarray): logit / T, or a * logit + b."""
        if self.method == "temperature":
            return logit / self.temperature
        if self.method == "platt":
            return self.a * logit + self.b
        return logit

    def to_dict(self) -> dict[str, Any]:
        if self.method == "temperature":
            return {"method": "temperature", "temperature": self.temperature}
        if self.method == "platt":
            return {"method": "platt", "a": self.a, "b": self.b}
        return {"method": "none"}

    @classmethod
    def from_dict(cls, d: Any, source: str) -> Scaling:
        """Checked: a scaling no ``ferret calibrate`` writes (T <= 0, a <= 0: a reversed or flat ranking) is refused."""
        where = f"{source}: metadata {PREFIX}provenance.{CALIBRATION_KEY}.scaling"
        if not isinstance(d, dict) or d.get("method") not in SCALING_METHODS:
            raise ConfigError(f"{where}: received {d!r}; expected an object whose method is one of "
                              f"{', '.join(SCALING_METHODS)}")
        params = {"temperature": ("temperature",), "platt": ("a", "b"), "none": ()}[d["method"]]
        values = {}
        for p in params:
            v = d.get(p)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"{where}: received {p} {v!r}; expected a finite number")
            values[p] = float(v)
        for p in ("temperature", "a"):
            if p in values and values[p] <= 0:
                raise ConfigError(f"{where}: received {p} {values[p]!r}; expected > 0 (a monotone increasing map)")
        return cls(d["method"], **values)


def calibration_record(extra: dict[str, Any]) -> dict[str, Any] | None:
    """The calibration record in ``ModelInfo.extra`` (its provenance), or None for an uncalibrated model."""
    prov = extra.get("provenance")
    rec = prov.get(CALIBRATION_KEY) if isinstance(prov, dict) else None
    return rec if isinstance(rec, dict) else None


def scaling_of(extra: dict[str, Any], source: str) -> Scaling:
    """The logit scaling a model's ``ModelInfo.extra`` carries; identity when it was never calibrated."""
    rec = calibration_record(extra)
    if rec is None:
        prov = extra.get("provenance")
        if isinstance(prov, dict) and CALIBRATION_KEY in prov:
            raise ConfigError(f"{source}: received metadata {PREFIX}provenance.{CALIBRATION_KEY}="
                              f"{prov[CALIBRATION_KEY]!r}; expected a calibration object")
        return Scaling()
    return Scaling.from_dict(rec.get("scaling"), source)
