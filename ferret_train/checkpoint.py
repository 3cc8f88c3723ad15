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
from ferret_runtime.lpd_spec import LPD_FUNCS, check_window
from ferret_runtime.preprocess import Preprocess

from .models import FerretConfig, FerretNet, from_config

FORMAT = "ferretnet-deploy/1"
# The original repository names checkpoints '<model>-<lpd func>-<window>.pth'
_NAME_RE = re.compile(rf"-({'|'.join(LPD_FUNCS)})-([357])\.pth?$", re.IGNORECASE)
_KNOWN_ARCHS = {(32, (2, 2)): "ferretnet-s", (96, (2, 2)): "ferretnet-b"}


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
        return obj
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"model": obj}  # a bare state dict
    keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointError(f"{path}: received {keys}; expected a dict with a 'model' state dict")


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
    stages: dict[int, set[int]] = {}
    for k in state:
        m = re.match(r"feature\.(\d+)\.(\d+)\.layers\.", k)
        if m:
            stages.setdefault(int(m[1]), set()).add(int(m[2]))
    depths = tuple(len(stages[i]) for i in sorted(stages))
    dim = int(w1.shape[0]) * 2
    arch = _KNOWN_ARCHS.get((dim, depths), f"ferretnet-custom-d{dim}")
    return FerretConfig(dim=dim, depths=depths, num_classes=int(head.shape[0]), in_channels=int(w1.shape[1]), arch=arch)


def _strict_load(model: FerretNet, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected) if state[k].shape != expected[k].shape
    )
    problems = [f"{label} ({len(v)}): {', '.join(v[:10])}{' ...' if len(v) > 10 else ''}"
                for label, v in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped", shapes)) if v]
    if problems:
        raise CheckpointError(f"{path}: does not match {model.cfg.arch}: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def load_checkpoint(path: str | os.PathLike, *, lpd_func: str | None = None, window_size: int | None = None,
                    lpd_impl: str = "fast") -> Loaded:
    """Restore a model; ``lpd_func``/``window_size`` override or supply the LPD setting."""
    path = Path(path)
    ckpt = read_checkpoint(path)
    state = {k.removeprefix("module."): v for k, v in ckpt["model"].items()}
    if "model_config" in ckpt:
        cfg_d = dict(ckpt["model_config"])
        cfg_d["depths"] = tuple(cfg_d["depths"])
        try:
            cfg = FerretConfig(**cfg_d)
        except TypeError as e:
            raise CheckpointError(f"{path}: invalid model_config ({e})") from None
        source, lpd_source = ckpt.get("format", FORMAT), "checkpoint"
    else:
        cfg, source = infer_config(state, path), "original"
        m = _NAME_RE.search(path.name)
        if m:
            cfg = FerretConfig(**{**cfg.to_dict(), "depths": cfg.depths, "lpd_func": m[1].lower(), "window_size": int(m[2])})
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
    model = from_config(cfg, lpd_impl=lpd_impl)
    _strict_load(model, state, path)
    model.eval()
    pre = Preprocess.from_dict(ckpt["preprocess"]) if "preprocess" in ckpt else Preprocess()
    return Loaded(model, cfg, pre, source, lpd_source, dict(ckpt.get("train_config", {})), dict(ckpt.get("meta", {})))


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
