"""FerretNet in PyTorch: models, checkpoints, training and evaluation."""

from . import models  # noqa: F401  (registers the model families)
from .registry import create_model, list_models

__all__ = ["create_model", "list_models"]
