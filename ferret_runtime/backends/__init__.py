"""Runtime backends behind one interface."""

from .base import Backend, ModelInfo, available_backends, backend_for

__all__ = ["Backend", "ModelInfo", "available_backends", "backend_for"]
