"""Runtime backends behind one interface."""

from .base import EXTERNAL_LPD, Backend, ModelInfo, available_backends, backend_for, backend_named, external_lpd

__all__ = ["EXTERNAL_LPD", "Backend", "ModelInfo", "available_backends", "backend_for", "backend_named", "external_lpd"]
