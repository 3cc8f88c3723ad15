"""A scan's Ray path: a callable class for Ray Data's ``Dataset.map_batches``, one Detector per actor.

    import ray
    from ferret_runtime.scan import predict_dataset

    ds = ray.data.read_parquet("manifest.parquet")            # a "path" column (local paths or URIs), or
    ds = ray.data.read_binary_files("s3://bucket/images/", include_paths=True)  # "bytes" and "path"
    predict_dataset(ds, "ferretnet-s.onnx", concurrency=4).write_parquet("results/")

Rows out: ``path, logit, prob_fake, label, error, model_sha256, scanned_at, path_bytes``
(``ferret_runtime.scan.rows``). The model file (and local image paths) must be readable on every
node. ``ferret scan --ray`` runs the same class through :func:`score_on_ray`, and the run commits
resumable parts as the results stream back. Each actor scores with the ``scorer`` a local scan
uses; this module never imports the run. Ray itself is imported only by the functions that use it,
so this module imports without the extra. :func:`init_local` starts a single-machine instance that
talks over 127.0.0.1 only.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import ConfigError
from .rows import from_raw, raw
from .scorer import Scorer, chunks


class FerretPredictor:
    """``map_batches`` callable: loads the model once per actor, scores each batch of paths (or bytes)."""

    def __init__(self, model: str | os.PathLike, *, model_sha256: str | None = None, path_column: str = "path",
                 bytes_column: str = "bytes", **detector_options: Any):
        self.scorer = Scorer(model, model_sha256=model_sha256, **detector_options)
        self.path_column, self.bytes_column = path_column, bytes_column

    def __call__(self, batch: Any) -> Any:
        paths, blobs = batch_paths(batch, self.path_column, self.bytes_column)
        return self.scorer.score(paths, blobs)


def batch_paths(batch: Any, path_column: str = "path", bytes_column: str = "bytes") -> tuple[list[str], list | None]:
    """(paths, bytes or None) of a Ray Data batch: a pyarrow Table or a dict of numpy arrays (a
    ``read_binary_files(..., include_paths=True)`` dataset brings the bytes along)."""
    if hasattr(batch, "column_names"):
        cols = batch.column_names
        get = lambda c: batch.column(c).to_pylist()  # noqa: E731
    else:
        cols = list(batch)
        get = lambda c: list(batch[c])  # noqa: E731
    if path_column not in cols:
        raise ConfigError(f"Received a batch with columns {cols}; expected a {path_column!r} column")
    # a binary path column holds a name's exact bytes (ferret scan sends names that are not UTF-8 so)
    paths = [from_raw(bytes(p)) if isinstance(p, (bytes, bytearray)) else str(p) for p in get(path_column)]
    return paths, ([bytes(b) for b in get(bytes_column)] if bytes_column in cols else None)



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


def score_on_ray(todo: list[str], model: str | os.PathLike, sha: str, address: str, part_rows: int,
                 batch_size: int, concurrency: int, num_gpus: float | None, num_cpus: float,
                 options: dict[str, Any]) -> Iterable[Any]:
    """Parts scored by Ray Data actors (:func:`predict_dataset`), as tables of rows that stream back to the run."""
    try:
        import ray
    except ImportError as e:
        raise ConfigError(f"--ray needs the 'ray' extra (missing {e.name}): pip install "
                          "'ferretnet-deploy[ray]'") from None
    import pyarrow as pa

    if not ray.is_initialized():
        if address == "local":
            init_local(logging_level="WARNING", log_to_driver=False)
        else:
            ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours reports rows/s and ETA
    # one block per part-sized slice: the actors share the work from the first block on; paths travel
    # as their bytes (a name that is not UTF-8 is no Arrow string)
    blocks = [pa.table({"path": pa.array([raw(p) for p in chunk], pa.binary())})
              for chunk in chunks(todo, max(1, min(part_rows, -(-len(todo) // concurrency))))]
    ds = predict_dataset(ray.data.from_arrow(blocks), model, model_sha256=sha, concurrency=concurrency,
                         batch_size=batch_size, num_gpus=num_gpus, num_cpus=num_cpus, **options)
    return ds.iter_batches(batch_size=part_rows, batch_format="pyarrow")
