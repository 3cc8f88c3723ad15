"""``ferret_runtime.integrations.ray``: the documented import path of the Ray Data integration, kept.

The code is :mod:`ferret_runtime.scan.ray` (a scan's Ray path, beside the scorer it shares with a local
scan); this module re-exports its public names so ``from ferret_runtime.integrations.ray import
predict_dataset`` keeps working. New code may import them from ``ferret_runtime.scan``.
"""

from __future__ import annotations

from ..scan.ray import LOOPBACK_ENV, FerretPredictor, gpus_per_actor, init_local, loopback_only, predict_dataset

__all__ = ["LOOPBACK_ENV", "FerretPredictor", "gpus_per_actor", "init_local", "loopback_only", "predict_dataset"]
