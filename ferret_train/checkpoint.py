"""Load the authors' checkpoints and ours, strictly; save atomically.

Formats:
- original: ``{'model': state_dict}`` (keys may carry DataParallel's ``module.`` prefix);
- ours: the same ``'model'`` key (so the original code can load it too) plus ``model_config``,
  ``preprocess``, ``train_config`` and ``meta``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ferret_runtime import __version__
from ferret_runtime.errors import CheckpointError, ConfigError
from ferret_runtime.fileio import atomic_write
from ferret_runtime.lpd_spec import LPD_FUNCS, WINDOW_SIZES, check_window
from ferret_runtime.metadata import ARCHS, CALIBRATION_KEY, PREFIX, Scaling, preprocess_from
from ferret_runtime.preprocess import Preprocess

from .models import FerretConfig, FerretNet, from_config
from .models.ferretnet import expected_shapes

FORMAT = "ferretnet-deploy/1"
# The original repository names checkpoints '<model>-<lpd func>-<window>.pth'
_NAME_RE = re.compile(rf"-({'|'.join(LPD_FUNCS)})-([357])\.pth?$", re.IGNORECASE)
_KNOWN_ARCHS = {(a.dim, a.depths): name for name, a in ARCHS.items()}
# Bounds on what a checkpoint may ask for, checked before anything is built. FerretNet-B is dim 96
# with 2 stages of 2 blocks; these leave room for far larger custom shapes, not for terabytes.
MAX_DIM, MAX_STAGES, MAX_BLOCKS = 4096, 8, 64
_SHAPE_FIELDS = ("dim", "depths", "num_classes", "in_channels")  # what the tensor shapes determine


@dataclass
class Loaded:
    """A model restored from a checkpoint, with what the checkpoint said about it."""

    model: FerretNet
    config: FerretConfig
    preprocess: Preprocess
    source_format: str  # "original" or FORMAT
    lpd_source: str  # where the LPD setting came from: "checkpoint", "file name", "argument", "default"
    train_config: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None  # what 'ferret calibrate' fitted: scaling, threshold, data


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The raw checkpoint dict (weights_only); errors name the file and the problem."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types (UnpicklingError, RuntimeError, EOFError...)
        raise CheckpointError(f"{path}: not a loadable PyTorch checkpoint with weights_only=True "
                              f"({_reason(e)})") from None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        _check_state_entries(obj["model"], path)
        return obj
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        _check_state_entries(obj, path)
        return {"model": obj}  # a bare state dict
    keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointError(f"{path}: received {keys}; expected a dict with a 'model' state dict")


def _check_state_entries(state: dict, path: Path) -> None:
    """Every entry of a state dict is a tensor under a string key (later code relies on both)."""
    for k, v in state.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: received state dict entry {k!r} of type {type(v).__name__}; "
                                  "expected tensors under string keys")


def _reason(e: Exception) -> str:
    """The informative line of torch.load's error (it prefers a long preamble with ANSI codes)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in str(e).splitlines()]
    for ln in lines:
        if "Unsupported global" in ln or "WeightsUnpickler error" in ln:
            return ln
    return next((ln for ln in lines if ln), type(e).__name__)


def infer_config(state: dict[str, torch.Tensor], path: Path | str = "<state dict>") -> FerretConfig:
    """Recover dim, depths, channels and classes from tensor shapes (the LPD leaves no trace)."""
    try:
        w1 = state["cbr1.0.weight"]
        head = state["logit.1.weight"]
    except KeyError as e:
        raise CheckpointError(f"{path}: missing key {e.args[0]!r}; not a FerretNet state dict") from None
    if w1.dim() != 4 or head.dim() != 2:
        raise CheckpointError(f"{path}: received cbr1.0.weight {tuple(w1.shape)} "
                              f"and logit.1.weight {tuple(head.shape)}; "
                              "expected a 4-D convolution weight and a 2-D linear weight")
    stages: dict[int, set[int]] = {}
    for k in state:
        m = re.match(r"feature\.(\d+)\.(\d+)\.layers\.", k)
        if m:
            stages.setdefault(int(m[1]), set()).add(int(m[2]))
    depths = tuple(len(stages[i]) for i in sorted(stages))
    dim = int(w1.shape[0]) * 2
    arch = _KNOWN_ARCHS.get((dim, depths), f"ferretnet-custom-d{dim}")
    return FerretConfig(dim=dim, depths=depths, num_classes=int(head.shape[0]), in_channels=int(w1.shape[1]), arch=arch)


def _int_field(value: Any, name: str, lo: int, hi: int, source: str, path: Path) -> int:
    # bool is an int to Python; a config saying "dim: true" is corrupt, not dim 1
    if type(value) is not int or not lo <= value <= hi:
        raise CheckpointError(f"{path}: {source} says {name} {value!r}; expected an int in {lo}..{hi}")
    return value


def check_config(cfg: FerretConfig, path: Path, source: str = "model_config") -> FerretConfig:
    """Type and range of every field, before anything is built; ``source`` names who said it."""
    _int_field(cfg.dim, "dim", 2, MAX_DIM, source, path)
    if cfg.dim % 2:
        raise CheckpointError(f"{path}: {source} says dim {cfg.dim}; "
                              "expected an even int (the stem has dim/2 channels)")
    if not isinstance(cfg.depths, tuple) or not 1 <= len(cfg.depths) <= MAX_STAGES:
        raise CheckpointError(f"{path}: {source} says depths "
                              f"{list(cfg.depths) if isinstance(cfg.depths, tuple) else cfg.depths!r}; "
                              f"expected 1..{MAX_STAGES} stages")
    for d in cfg.depths:
        _int_field(d, "a stage depth", 1, MAX_BLOCKS, source, path)
    if cfg.num_classes != 1 or type(cfg.num_classes) is not int:
        raise CheckpointError(f"{path}: {source} says num_classes {cfg.num_classes!r}; "
                              "expected 1 (one logit per image: fake vs real)")
    if cfg.in_channels != 3 or type(cfg.in_channels) is not int:
        raise CheckpointError(f"{path}: {source} says in_channels {cfg.in_channels!r}; expected 3 (RGB)")
    if cfg.lpd_func not in LPD_FUNCS:
        raise CheckpointError(f"{path}: {source} says lpd_func {cfg.lpd_func!r}; "
                              f"expected one of {', '.join(LPD_FUNCS)}")
    if cfg.window_size not in WINDOW_SIZES or type(cfg.window_size) is not int:
        raise CheckpointError(f"{path}: {source} says window_size {cfg.window_size!r}; expected one of {WINDOW_SIZES}")
    if not isinstance(cfg.arch, str) or not 0 < len(cfg.arch) <= 100:
        raise CheckpointError(f"{path}: {source} says arch {cfg.arch!r}; expected a name such as {', '.join(ARCHS)}")
    return cfg


def _config_from_checkpoint(raw: Any, path: Path) -> FerretConfig:
    """The stored model_config as a FerretConfig; unknown keys and wrong types are refused."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: received model_config of type {type(raw).__name__}; expected a dict")
    known = set(FerretConfig.__dataclass_fields__)
    if set(raw) - known:
        raise CheckpointError(f"{path}: received model_config keys {sorted(map(str, set(raw) - known))}; "
                              f"expected a subset of {sorted(known)}")
    d = dict(raw)
    if isinstance(d.get("depths"), (list, tuple)):
        d["depths"] = tuple(d["depths"])
    return FerretConfig(**d)


def _fmt(value: Any) -> str:
    """depths as a list, as a config file writes them; strings quoted, so '32' is not mistaken for 32."""
    return str(list(value)) if isinstance(value, tuple) else repr(value) if isinstance(value, str) else str(value)


def check_against_weights(cfg: FerretConfig, state: dict[str, torch.Tensor], path: Path) -> None:
    """What the file's model_config says must be what its weights are, field by field.

    Checked before the model is built, so a config asking for dim 2**22 is refused by name instead of
    failing in the allocator.
    """
    have = infer_config(state, path)
    for name in _SHAPE_FIELDS:
        if getattr(cfg, name) != getattr(have, name):
            raise CheckpointError(f"{path}: model_config says {name} {_fmt(getattr(cfg, name))}; "
                                  f"the weights have {name} {_fmt(getattr(have, name))}")


def check_arch_name(cfg: FerretConfig, path: Path) -> None:
    """A known architecture name promises its shape (ferretnet-b is dim 96, never 32)."""
    known = ARCHS.get(cfg.arch)  # check_config made arch a str
    if known is None:
        return
    for name, want in (("dim", known.dim), ("depths", known.depths), ("num_classes", 1), ("in_channels", 3)):
        if getattr(cfg, name) != want:
            raise CheckpointError(f"{path}: model_config says arch {cfg.arch}, which has {name} {_fmt(want)}; "
                                  f"the weights have {name} {_fmt(getattr(cfg, name))}")


def _check_shapes(cfg: FerretConfig, state: dict[str, torch.Tensor], path: Path) -> None:
    """Every key and tensor shape the model needs, compared on the meta device before building it."""
    expected = expected_shapes(cfg)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {expected[k]}"
        for k in set(state) & set(expected) if tuple(state[k].shape) != expected[k]
    )
    problems = [f"{label} ({len(v)}): {', '.join(v[:10])}{' ...' if len(v) > 10 else ''}"
                for label, v in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped", shapes))
                if v]
    if problems:
        raise CheckpointError(f"{path}: does not match {cfg.arch}: " + "; ".join(problems))


def load_checkpoint(path: str | os.PathLike, *, lpd_func: str | None = None, window_size: int | None = None,
                    lpd_impl: str = "fast") -> Loaded:
    """Restore a model; ``lpd_func``/``window_size`` override or supply the LPD setting.

    Everything the file says is checked before the model is built: the config's fields and their
    bounds, the config against the weights' shapes, the preprocessing.
    """
    path = Path(path)
    ckpt = read_checkpoint(path)
    state = {k.removeprefix("module."): v for k, v in ckpt["model"].items()}
    if "model_config" in ckpt:
        try:
            cfg = _config_from_checkpoint(ckpt["model_config"], path)
        except TypeError as e:
            raise CheckpointError(f"{path}: invalid model_config ({e})") from None
        check_against_weights(cfg, state, path)  # first: the most telling message for a config that lies
        check_config(cfg, path)  # the bounds, now also those of the weights' shape
        check_arch_name(cfg, path)
        source, lpd_source = ckpt.get("format", FORMAT), "checkpoint"
    else:
        cfg, source = check_config(infer_config(state, path), path, "the state dict"), "original"
        m = _NAME_RE.search(path.name)
        if m:
            cfg = FerretConfig(**{**cfg.to_dict(), "depths": cfg.depths, "lpd_func": m[1].lower(),
                                  "window_size": int(m[2])})
            lpd_source = "file name"
        else:
            lpd_source = "default"
    if lpd_func is not None or window_size is not None:
        cfg = FerretConfig(**{**cfg.to_dict(), "depths": cfg.depths,
                              "lpd_func": lpd_func or cfg.lpd_func, "window_size": window_size or cfg.window_size})
        lpd_source = "argument"
    if cfg.lpd_func not in LPD_FUNCS:
        raise ConfigError(f"Received LPD function {cfg.lpd_func!r}; expected one of {', '.join(LPD_FUNCS)}")
    check_window(cfg.window_size)
    pre = preprocess_from(ckpt["preprocess"], str(path)) if "preprocess" in ckpt else Preprocess()
    _check_shapes(cfg, state, path)
    model = from_config(cfg, lpd_impl=lpd_impl)
    model.load_state_dict(state, strict=True)
    model.eval()
    return Loaded(model, cfg, pre, source, lpd_source, dict(ckpt.get("train_config", {})), dict(ckpt.get("meta", {})),
                  check_calibration(ckpt.get(CALIBRATION_KEY), path))


def check_calibration(record: Any, path: Path) -> dict[str, Any] | None:
    """A checkpoint's calibration record (None when absent): its scaling and threshold checked."""
    if record is None:
        return None
    if not isinstance(record, dict):
        raise CheckpointError(f"{path}: received {CALIBRATION_KEY} of type {type(record).__name__}; expected a dict")
    try:
        Scaling.from_dict(record.get("scaling"), str(path))
    except ConfigError as e:  # its message names the ONNX key; here it is the checkpoint's
        raise CheckpointError(str(e).replace(f"metadata {PREFIX}provenance.", "")) from None
    t = record.get("threshold")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
        raise CheckpointError(f"{path}: received {CALIBRATION_KEY}.threshold {t!r}; expected a probability in [0, 1]")
    return record


def save_checkpoint(path: str | os.PathLike, model: FerretNet, *, preprocess: Preprocess | None = None,
                    train_config: dict[str, Any] | None = None, meta: dict[str, Any] | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write our format atomically; ``extra`` adds keys (optimizer state, epoch, ...)."""
    ckpt = {
        "format": FORMAT,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_config": model.cfg.to_dict(),
        "preprocess": (preprocess or Preprocess()).to_dict(),
        "train_config": train_config or {},
        "meta": {"toolkit_version": __version__, "torch_version": str(torch.__version__), **(meta or {})},
        **(extra or {}),
    }
    return atomic_write(path, lambda f: torch.save(ckpt, f))
