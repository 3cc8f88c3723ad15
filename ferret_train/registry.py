"""Build models by name. Registering a name twice is an error."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from torch import nn

from ferret_runtime.errors import ConfigError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"Model {name!r} is already registered (by {_MODELS[name].__module__})")
        _MODELS[name] = fn
        return fn

    return deco


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate a registered model; unknown names list the valid ones and the nearest match."""
    if name not in _MODELS:
        near = difflib.get_close_matches(name, _MODELS, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"Received model {name!r}{hint}; expected one of {', '.join(list_models())}")
    return _MODELS[name](**kwargs)
