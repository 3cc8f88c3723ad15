"""Bulk inference on Ray Data: a callable class for ``Dataset.map_batches``, one Detector per actor.

    import ray
    from ferret_runtime.integrations.ray import predict_dataset

    ds = ray.data.read_parquet("manifest.parquet")            # a "path" column (local paths or URIs), or
    ds = ray.data.read_binary_files("s3://bucket/images/", include_paths=True)  # "bytes" and "path"
    predict_dataset(ds, "ferretnet-s.onnx", concurrency=4).write_parquet("results/")

Rows out: ``path, logit, prob_fake, label, error, model_sha256, scanned_at, path_bytes``
(``ferret_runtime.scan_rows``). The model file (and local image paths) must be readable on every
node. ``ferret scan --ray`` runs the same class, committing resumable parts as the results stream
back. Ray itself is imported only by the functions that use it, so this module imports without the
extra. :func:`init_local` starts a single-machine instance that talks over 127.0.0.1 only.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..scan import Scorer, batch_paths


class FerretPredictor:
    """``map_batches`` callable: loads the model once per actor, scores each batch of paths (or bytes)."""

    def __init__(self, model: str | os.PathLike, *, model_sha256: str | None = None, path_column: str = "path",
                 bytes_column: str = "bytes", **detector_options: Any):
        self.scorer = Scorer(model, model_sha256=model_sha256, **detector_options)
        self.path_column, self.bytes_column = path_column, bytes_column

    def __call__(self, batch: Any) -> Any:
        paths, blobs = batch_paths(batch, self.path_column, self.bytes_column)
        return self.scorer.score(paths, blobs)


# Ray swaps 127.0.0.1 for the machine's external address (``resolve_ip_for_localhost``: a node must be
# reachable from others) unless multi-node clusters are off, which is what this variable, named for
# Windows and macOS where that is the default, turns off everywhere.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextmanager
def loopback_only() -> Iterator[None]:
    """While it lasts, Ray started here advertises and listens on 127.0.0.1: the variable for the
    processes it starts, and the constant Ray read from it at import, for this one."""
    from ray._private import ray_constants  # private: where Ray keeps what it read from the variable

    before_env, before_const = os.environ.get(LOOPBACK_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOOPBACK_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:  # what the process had: a later ray.init(address=...) joins clusters as usual
        ray_constants.ENABLE_RAY_CLUSTER = before_const
        if before_env is None:
            os.environ.pop(LOOPBACK_ENV, None)
        else:
            os.environ[LOOPBACK_ENV] = before_env


def init_local(**kwargs: Any) -> Any:
    """``ray.init`` of a new single-machine instance whose traffic stays on 127.0.0.1 (``--ray local``)."""
    import ray

    with loopback_only():
        return ray.init(address="local", _node_ip_address="127.0.0.1", **kwargs)


def gpus_per_actor(device: str = "auto") -> float:
    """One GPU per actor where the cluster has GPUs and the device is not the CPU; else none."""
    if device == "cpu":
        return 0.0
    import ray

    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def predict_dataset(ds: Any, model: str | os.PathLike, *, concurrency: int = 2, batch_size: int = 32,
                    num_gpus: float | None = None, num_cpus: float = 1, device: str = "auto",
                    model_sha256: str | None = None, **detector_options: Any) -> Any:
    """``ds.map_batches(FerretPredictor, ...)``: ``concurrency`` actors, ``batch_size`` images per call
    (the Detector's batch too), ``num_gpus`` each (None: :func:`gpus_per_actor`)."""
    from ray.data import ActorPoolStrategy

    gpus = gpus_per_actor(device) if num_gpus is None else num_gpus
    kwargs = {"model_sha256": model_sha256, "device": device, "batch_size": batch_size, **detector_options}
    # an actor pool of fixed size (``compute``: Ray 2.51 deprecates ``concurrency`` for it)
    return ds.map_batches(FerretPredictor, fn_constructor_args=(str(model),), fn_constructor_kwargs=kwargs,
                          batch_size=batch_size, batch_format="pyarrow", compute=ActorPoolStrategy(size=concurrency),
                          num_cpus=num_cpus, num_gpus=gpus)
