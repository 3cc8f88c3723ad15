"""``--backend auto`` for ``.onnx`` models on the CPU: measure the installed CPU runtimes once per host and model.

ONNX Runtime and OpenVINO (each when installed) run the model at a few (streams, batch per stream) settings,
a fraction of a second each; the fastest in images per second wins. The whole table is cached on disk under
``$FERRET_CACHE/backends`` (else ``$XDG_CACHE_HOME/ferret/backends``, ``~/.cache/ferret/backends``, or one in
the temporary directory: the kernels' folders), keyed by the CPU model, the usable cores, the runtimes'
versions and the model file's SHA-256, so it is measured again only when one of them changes. An unreadable
cache file is measured again with a warning; an unwritable cache folder only means measuring next time too.

An explicit streams or batch size narrows the choice to the settings that have it (the runtime is still the
one measured fastest there).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, FerretError
from ..kernels import cache_dir, write_atomic
from .base import Backend, backend_for, backend_named
from .onnxruntime import default_streams

FORMAT = 1  # of the cache file; another value is measured again
BATCHES = (1, 2)  # images per stream per batch, measured (4 and 32 measured no faster on 2-core AVX-512 EPYC)
SECONDS_PER_SETTING = 0.1  # timed per setting after one warm-up round (at least one timed round)
DEFAULT_RUNTIME = "onnxruntime"  # the .onnx suffix's backend
MARGIN = 0.05  # another runtime is taken only when measured at least this much faster than the default
RUNTIMES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}  # backend name -> its package


def installed_runtimes() -> dict[str, str]:
    """Backend name -> version of each CPU runtime installed (from package metadata; nothing imported)."""
    out = {}
    for name, package in RUNTIMES.items():
        try:
            out[name] = version(package)
        except PackageNotFoundError:
            if package == "onnxruntime":  # onnxruntime-gpu installs the same module
                try:
                    out[name] = version("onnxruntime-gpu")
                except PackageNotFoundError:
                    pass
    return out


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def host_key(path: Path, runtimes: dict[str, str], options: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a measurement depends on: when any of it changes, it is measured again."""
    return {"format": FORMAT, "cpu": cpu_model(), "cores": usable_cores(), "runtimes": dict(sorted(runtimes.items())),
            "model_sha256": file_sha256(path), "options": {k: repr(v) for k, v in sorted((options or {}).items())}}


def cache_path(key: dict[str, Any], folder: Path | None = None) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return (folder or default_cache_dir()) / f"auto-{digest}.json"


def default_cache_dir() -> Path:
    """The first writable ``backends`` folder of the kernels' cache roots (``$FERRET_CACHE`` first)."""
    return cache_dir("backends")


@dataclass
class Choice:
    """What ``auto`` took, and the table it took it from (``img_s`` per runtime, streams and batch)."""

    runtime: str
    streams: int
    batch: int
    table: list[dict[str, Any]] = field(default_factory=list)
    cached: bool = False
    path: Path | None = None

    def best(self, runtime: str) -> float | None:
        rates = [r["img_s"] for r in self.table if r["runtime"] == runtime]
        return max(rates) if rates else None

    def describe(self) -> str:
        """One line: what was chosen, how fast each runtime measured, and whether it came from the cache."""
        rates = ", ".join(f"{name} {self.best(name):.1f}" for name in sorted({r["runtime"] for r in self.table}))
        where = f"cached in {self.path}" if self.cached else "measured now" + (f", saved to {self.path}"
                                                                              if self.path else ", not saved")
        return (f"backend auto: {self.runtime}, {self.streams} stream(s) x batch {self.batch} "
                f"(best img/s: {rates}; {where})")


def settings(cores: int | None = None) -> list[tuple[int, int]]:
    """(streams, batch per stream) pairs measured: 1 stream and one per core (at most 4), batches of BATCHES."""
    streams = sorted({1, default_streams(cores)})
    return [(s, b) for s in streams for b in BATCHES]


def sample_batch(info: Any, n: int) -> np.ndarray:
    """``n`` images of noise in the model's input format (fixed size, else its crop, else 256)."""
    pre = info.preprocess
    h, w = info.input_hw or (pre.crop or 256, pre.crop or 256)
    shape = (n, h, w, 3) if pre.layout == "NHWC" else (n, 3, h, w)
    rng = np.random.default_rng(0)
    if pre.dtype == "uint8":
        return rng.integers(0, 256, shape, dtype=np.uint8)
    return rng.standard_normal(shape).astype(pre.dtype)


def rate(backend: Any, x: np.ndarray, seconds: float) -> float:
    """Images per second with one batch ``x`` per slot in flight, over at least ``seconds`` (and one round)."""
    n, start = 0, time.perf_counter()
    while True:
        for pending in [backend.submit(x) for _ in range(max(1, backend.slots))]:
            pending.result()
        n += x.shape[0] * max(1, backend.slots)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return n / elapsed


def warm_up(backend: Any, x: np.ndarray) -> None:
    """One round of ``x`` per slot, untimed: first-run allocations and per-shape kernel choices (OpenVINO
    prepares each new batch shape on its first call) stay out of the timing."""
    for pending in [backend.submit(x) for _ in range(max(1, backend.slots))]:
        pending.result()


def measure(path: Path, open_backend: Callable[..., Any], runtimes: list[str], options: dict[str, Any],
            seconds: float = SECONDS_PER_SETTING) -> list[dict[str, Any]]:
    """The table: img/s of each runtime at each of :func:`settings`. The first runtime's errors (a bad model)
    propagate; a later runtime that cannot run the model is left out with a warning."""
    table: list[dict[str, Any]] = []
    for i, runtime in enumerate(runtimes):
        for streams in sorted({s for s, _ in settings()}):
            try:
                with open_backend(runtime, path, device="cpu", streams=streams, **options) as be:
                    for s, batch in settings():
                        if s == streams:
                            x = sample_batch(be.info, batch)
                            warm_up(be, x)
                            table.append({"runtime": runtime, "streams": streams, "batch": batch,
                                          "img_s": round(rate(be, x, seconds), 3)})
            except FerretError as e:
                if i == 0:
                    raise
                warnings.warn(f"{path}: backend auto leaves out {runtime}: {e}", RuntimeWarning, stacklevel=2)
                table = [r for r in table if r["runtime"] != runtime]
                break
    return table


def _valid(data: Any, key: dict[str, Any]) -> list[dict[str, Any]]:
    """The cached table, or ValueError saying what is wrong with the file."""
    if not isinstance(data, dict) or data.get("key") != key:
        raise ValueError("its key is not this host's and model's")
    table = data.get("table")
    if not isinstance(table, list) or not table:
        raise ValueError("no measurements in it")
    for row in table:
        if not (isinstance(row, dict) and row.get("runtime") in RUNTIMES and isinstance(row.get("streams"), int)
                and isinstance(row.get("batch"), int) and isinstance(row.get("img_s"), (int, float))
                and row["streams"] >= 1 and row["batch"] >= 1 and row["img_s"] > 0):
            raise ValueError(f"a malformed row {row!r}")
    return table


def pick(table: list[dict[str, Any]], streams: int | None, batch: int | None) -> tuple[str, int, int]:
    """(runtime, streams, batch) of the fastest row that keeps the caller's streams and batch (when the table
    has them); an explicit value the table lacks is kept, with the runtime fastest over all rows. A runtime
    other than ONNX Runtime wins only by more than MARGIN (a shared machine's noise is a few percent)."""
    rows = [r for r in table if streams is None or r["streams"] == streams] or table
    rows = [r for r in rows if batch is None or r["batch"] == batch] or rows
    best = max(rows, key=lambda r: r["img_s"])
    default = [r for r in rows if r["runtime"] == DEFAULT_RUNTIME]
    if default and best["runtime"] != DEFAULT_RUNTIME:  # another runtime only when clearly faster, not on noise
        ort_best = max(default, key=lambda r: r["img_s"])
        if best["img_s"] < (1 + MARGIN) * ort_best["img_s"]:
            best = ort_best
    return best["runtime"], streams or best["streams"], batch or best["batch"]


def choose(path: str | Path, open_backend: Callable[..., Any], *, runtimes: list[str] | None = None,
           streams: int | None = None, batch: int | None = None, options: dict[str, Any] | None = None,
           cache: Path | None = None, seconds: float = SECONDS_PER_SETTING) -> Choice:
    """The runtime, streams and batch per stream to run ``path`` with on this host's CPU, measured once
    (``open_backend(name, path, **kwargs)`` opens a backend by name). ``runtimes``: the candidates, in order
    (default: those installed, onnxruntime first); ``cache``: the folder (default :func:`default_cache_dir`)."""
    path, options = Path(path), dict(options or {})
    installed = installed_runtimes()
    names = [r for r in (runtimes or list(RUNTIMES)) if r in installed]
    if not names:
        raise FerretError("backend auto found no CPU runtime: pip install 'ferretnet-deploy[export]' (onnxruntime) "
                          "or 'ferretnet-deploy[openvino]'")
    key = host_key(path, {n: installed[n] for n in names}, options)
    file = cache_path(key, cache)
    table = None
    if file.is_file():
        try:
            table = _valid(json.loads(file.read_text(encoding="utf-8")), key)
        except (OSError, ValueError) as e:  # JSONDecodeError is a ValueError
            warnings.warn(f"{file}: ignoring this backend auto cache file ({e}); measuring again", RuntimeWarning,
                          stacklevel=2)
    cached = table is not None
    if table is None:
        table = measure(path, open_backend, names, options, seconds)
        saved = write_atomic(file, json.dumps({"key": key, "table": table}, indent=1).encode())
        if not saved:
            file = None  # type: ignore[assignment]
    runtime, s, b = pick(table, streams, batch)
    return Choice(runtime, s, b, table, cached, file)


def runs_on_cpu(device: str) -> bool:
    """Whether an ``.onnx`` model opened with ``device`` runs on the CPU (``auto`` without ONNX Runtime's CUDA)."""
    if device == "cpu":
        return True
    if device != "auto":
        return False
    try:
        import onnxruntime as ort
    except ImportError:
        return True
    return "CUDAExecutionProvider" not in ort.get_available_providers()


def open_named(name: str, path: str | Path, **kwargs: Any) -> Any:
    """A backend opened by name (what :func:`choose` measures with)."""
    return backend_named(name, path)(path, **kwargs)


def resolve(path: str | Path, name: str | None, device: str, streams: int | None, batch: int | None,
            options: dict[str, Any]) -> tuple[type[Backend], Choice | None]:
    """The backend class for ``Detector.open``: ``name`` when it is not ``auto``; for ``auto`` the suffix's
    backend, except an ``.onnx`` model on the CPU, which gets the runtime :func:`choose` measured fastest
    (with the streams and batch it measured, unless the caller set them). ``name`` None: ``$FERRET_BACKEND``
    where that backend reads the file (a pinned runtime for a deployment or a test run), else auto."""
    if name is None:
        pinned = os.environ.get("FERRET_BACKEND", "auto").strip() or "auto"
        if pinned != "auto":
            try:
                return backend_named(pinned, path), None
            except ConfigError:
                pass  # not a file this backend reads: auto
        name = "auto"
    if name != "auto":
        return backend_named(name, path), None
    cls = backend_for(path)
    if cls.name != "onnxruntime" or not Path(path).is_file() or not runs_on_cpu(device):
        return cls, None
    candidates = []
    for runtime in installed_runtimes():
        try:
            runtime_cls = backend_named(runtime, path)
        except ConfigError:
            continue
        if set(options) <= set(inspect.signature(runtime_cls).parameters):  # options another runtime lacks: skip it
            candidates.append(runtime)
    if candidates in ([], ["onnxruntime"]) and streams is not None and batch is not None:
        return cls, None  # nothing left to choose
    choice = choose(path, open_named, runtimes=candidates or ["onnxruntime"], streams=streams, batch=batch,
                    options=options)
    return backend_named(choice.runtime, path), choice
