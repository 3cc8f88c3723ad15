"""Training configuration: dataclasses filled from YAML, then ``key=value`` overrides.

Mirrors the original Train.yaml (model, data, optim, loss, trainer, logger, seed, total_epochs).
Unknown keys are errors that name the nearest valid key; the resolved config is saved with the run.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ferret_runtime.errors import ConfigError
from ferret_runtime.preprocess import MEAN, STD


@dataclass
class ModelCfg:
    name: str = "ferretnet-b"  # a registered model (ferret_train.list_models())
    lpd_func: str = "median"
    window_size: int = 3
    init: str | None = None  # fine-tune from this checkpoint (any format load_checkpoint reads)


@dataclass
class AugmentCfg:
    """Robustness augmentations (off by default, as the original): each applied with its probability."""

    jpeg_prob: float = 0.0
    jpeg_quality: tuple[int, int] = (65, 100)
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    resize_prob: float = 0.0
    resize_scale: tuple[float, float] = (0.5, 1.5)


@dataclass
class DataCfg:
    train_root: str = "data/train"
    val_root: str | None = None  # ForenSynths layout; every subset is evaluated separately
    class_to_idx: dict[str, int] = field(default_factory=lambda: {"0_real": 0, "1_fake": 1})
    train_crop: int = 224  # RandomCrop(pad_if_needed) + RandomHorizontalFlip
    test_crop: int | None = 256  # CenterCrop(pad_if_needed); None keeps full size
    mean: tuple[float, float, float] = MEAN
    std: tuple[float, float, float] = STD
    hflip: bool = True
    augment: AugmentCfg = field(default_factory=AugmentCfg)
    workers: int = 2


@dataclass
class OptimCfg:
    name: str = "adam"  # adam | adamw | sgd
    lr: float = 2e-4
    betas: tuple[float, float] = (0.937, 0.999)
    weight_decay: float = 5e-4
    momentum: float = 0.9  # sgd only
    scheduler: str | None = None  # None | cosine
    warmup_epochs: int = 0


@dataclass
class LossCfg:
    name: str = "bce_with_logits"


@dataclass
class TrainerCfg:
    batch_size: int = 32  # global: split across DDP ranks
    batch_size_test: int = 32
    amp: bool = True  # mixed precision on CUDA (ignored on CPU)
    device: str = "auto"
    save_freq: int = 1  # epochs between last.pt writes
    val_freq: int = 1
    test_start_epoch: int = 1
    max_steps_per_epoch: int | None = None  # for smoke tests


@dataclass
class LoggerCfg:
    dir: str = "runs/train"  # a run goes to dir, dir2, dir3... (never over an earlier run)
    log_freq: int = 20  # steps between JSON-lines step records
    tensorboard: bool = True


@dataclass
class TrainConfig:
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    loss: LossCfg = field(default_factory=LossCfg)
    trainer: TrainerCfg = field(default_factory=TrainerCfg)
    logger: LoggerCfg = field(default_factory=LoggerCfg)
    seed: int = 42
    total_epochs: int = 100

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Check/convert a YAML or command-line value to the field's declared type."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: received {value!r}; expected {typ}")
    if origin is tuple:
        if isinstance(value, str):
            value = yaml.safe_load(value if value.startswith("[") else f"[{value}]")
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: received {value!r}; expected {len(args)} values")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: received {value!r}; expected a mapping")
        return {str(k): _coerce(v, args[1], where) for k, v in value.items()}
    if typ is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: received {value!r}; expected true or false")
    if typ in (int, float, str):
        try:
            if typ is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return typ(yaml.safe_load(value)) if isinstance(value, str) and typ is not str else typ(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: received {value!r}; expected {typ.__name__}") from None
    return value


def _merge(obj: Any, updates: dict[str, Any], prefix: str) -> Any:
    """A copy of dataclass ``obj`` with nested ``updates`` applied and type-checked."""
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    changes = {}
    for key, value in updates.items():
        where = f"{prefix}{key}"
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {prefix + near[0]!r}?" if near else ""
            raise ConfigError(f"unknown config key {where!r}{hint} (valid: {', '.join(names)})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: received {value!r}; expected a mapping")
            changes[key] = _merge(current, value, where + ".")
        else:
            changes[key] = _coerce(value, hints[key], where)
    return dataclasses.replace(obj, **changes)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["optim.lr=1e-3", "data.augment.jpeg_prob=0.1"]`` -> nested dict."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"Received override {item!r}; expected key=value, e.g. optim.lr=1e-3")
        key, value = item.split("=", 1)
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults <- YAML file <- command-line overrides."""
    cfg = TrainConfig()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: no such config file")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: received {type(data).__name__}; expected a mapping of config sections")
        cfg = _merge(cfg, data, "")
    return apply_overrides(cfg, overrides)


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """A config from a nested mapping (e.g. the one a checkpoint stores), checked like a YAML file."""
    return _merge(TrainConfig(), d, "")


def apply_overrides(cfg: TrainConfig, overrides: list[str] | None) -> TrainConfig:
    """``cfg`` with command-line ``key=value`` overrides applied and type-checked (unchanged without any)."""
    return _merge(cfg, parse_overrides(overrides), "") if overrides else cfg
