"""``ferret bench --workload``: what users run (camera photos, generator outputs, crops) through the Detector,
against the model alone, and where each image's time goes.

Per (model, workload), in one run on the same files:

- **end to end**: ``Detector.open(model.onnx).predict(paths)``, the whole pipeline with its defaults (decoding on
  the thread pool while the model runs), best of ``repeats`` rounds that interleave every workload and kind (a
  shared machine's busy moments fall on all rows alike), with region decoding and without
  (``ferret_runtime.decode.load_prepared(region=...)``); as images/s and wall-ms per image;
- **the model alone**: the same backend on ready float32 batches, every slot in flight (the ceiling);
- **the split**: each stage run alone, serially, on one thread (the model with one 1-thread session), so each is
  the *core-ms* an image costs there: read bytes, decode + crop (region on, and off), preprocess (stack,
  normalise), model; and the same chain timed as a whole (``serial_ms``), which the stages must add up to.
  The pipeline's wall-ms per image is less than the stages' sum: decoding overlaps the model on several cores.

The model's throughput is also given as a fraction of the host's float32 FMA peak
(``ferret_runtime.hostinfo.fma_peak``), from its multiply-adds per image (``count_flops`` / 2).
"""

from __future__ import annotations

import inspect
import platform
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ferret_export.bench.workload import WORKLOADS, Workload, build
from ferret_runtime import Detector
from ferret_runtime.errors import ConfigError, FerretError, ImageError
from ferret_runtime.preprocess import Preprocess, load_image, median_residual, normalize, prepare

SCHEMA = "ferret-bench-realworld/1"
STAGES = ("read", "decode_crop", "preprocess", "model")
MODES = {"region": True, "full": False}  # decode+crop with region decoding, and the full decode (the old path)
# the goals: (numerator workload, denominator workload or "model", least ratio)
GOALS = (("camera", "crop256", 0.70), ("camera-png", "crop256", 0.35), ("crop256", "model", 0.90))


def _loader() -> tuple[Callable[..., np.ndarray], dict[str, str]]:
    """``ferret_runtime.decode.load_prepared`` and its ``decoders()`` lines, or the full decode where absent."""
    try:
        from ferret_runtime.decode import decoders, load_prepared

        return load_prepared, dict(decoders())
    except ImportError as e:
        def full(source, pre, name=None, *, max_pixels=None, region=True):
            return prepare(load_image(source, name, max_pixels=max_pixels), pre)

        return full, {"all": f"ferret_runtime.decode not importable ({e}): full decode"}


LOAD_PREPARED, DECODERS = _loader()


class SwitchedDetector(Detector):
    """The Detector with its decode switched between region decoding and the full decode, for the comparison.

    Used only where ``Detector.open`` has no ``region`` option of its own; it decodes as the Detector does
    (the same errors, one input's failure its own), through ``load_prepared``."""

    region = True

    def _decode(self, item, name):  # the Detector's decode, through load_prepared(region=...)
        try:
            return LOAD_PREPARED(item, self.preprocess, name, max_pixels=self.max_pixels, region=self.region)
        except FerretError as e:
            return e
        except Exception as e:
            return ImageError(f"{name}: cannot decode image ({type(e).__name__}: {e})")


def open_detector(onnx: Path, *, region: bool, **options: Any) -> Detector:
    """``Detector.open`` with region decoding on or off (its own option when it has one)."""
    if "region" in inspect.signature(Detector.open).parameters or "region" in inspect.signature(Detector).parameters:
        return Detector.open(onnx, region=region, **options)
    det = SwitchedDetector.open(onnx, **options)
    det.region = region
    return det


@dataclass
class RealWorldConfig:
    models: tuple[str, ...] = ("ferretnet-b", "ferretnet-s")
    workloads: tuple[str, ...] = WORKLOADS
    count: int | None = None  # files per set (None: workload.DEFAULT_COUNTS)
    scale: float = 1.0  # every generated size times this (tests: 0.1)
    batch: int | None = None  # None: the Detector's own default
    repeats: int = 3
    warmup: int = 1
    image_size: int = 256
    threads: int | None = None
    streams: int | None = None
    modes: tuple[str, ...] = ("region", "full")
    split_files: int = 24  # the split runs on this many of a workload's files, evenly spaced (one thread: slow)
    root: str | None = None  # the workload cache (None: workload.cache_root())


@dataclass
class Result:
    model: str
    workload: str
    images: int
    mb_per_image: float
    formats: dict[str, int]
    batch: int = 0  # the Detector's batch size (its default unless --batch-sizes)
    e2e: dict[str, dict[str, float]] = field(default_factory=dict)  # mode -> img_s, wall_ms_per_image, errors
    model_alone: dict[str, float] = field(default_factory=dict)  # img_s, ms_per_image (all cores)
    split_ms: dict[str, float] = field(default_factory=dict)  # stage -> core-ms per image (one thread)
    serial_ms: dict[str, float] = field(default_factory=dict)  # mode -> the chain timed as a whole, per image


def machine_name(hw: dict[str, Any]) -> str:
    return f"{platform.system()} {platform.machine()} / {hw['cpu']} ({hw.get('cpu_cores_usable', hw['cpu_cores'])} " \
           f"cores)"


def fma_peak_record() -> dict[str, Any] | None:
    try:
        from ferret_runtime.hostinfo import fma_peak
    except ImportError:
        return None
    try:
        p = fma_peak()
        return {"cores": p.cores, "fma_units": p.fma_units, "lanes": p.lanes, "ghz": p.ghz, "source": p.source,
                "macs_per_s": float(p.macs_per_s), "describe": p.describe()}
    except Exception as e:  # a host it cannot read: the fraction is left out, the rest stands
        return {"error": f"{type(e).__name__}: {e}"}


def measure_rounds(onnx: Path, sets: dict[str, list[str]], cfg: RealWorldConfig,
                   used: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Per workload: end to end per decode mode and the model alone, best of ``repeats`` rounds; ``used`` gets
    the runtime, streams and batch the Detector ran (and what ``--backend auto`` measured, when it chose).

    Side by side: a round times every workload and every kind (model alone, then each decode mode) once, one
    after the other, so a busy moment of a shared machine falls on all of them alike rather than on one row.
    The model alone is the Detector's own backend on ready float32 batches, one batch per slot in flight."""
    from contextlib import ExitStack

    from ferret_export.bench.runners import steady_state

    opts = dict(crop=cfg.image_size, threads=cfg.threads or 0, streams=cfg.streams)
    if cfg.batch is not None:
        opts["batch_size"] = cfg.batch
    best: dict[tuple[str, str], float] = {}

    def timed(key: tuple[str, str], fn: Callable[[], Any]) -> None:
        t0 = time.perf_counter()
        fn()
        best[key] = min(best.get(key, float("inf")), time.perf_counter() - t0)

    with ExitStack() as stack:
        dets = {m: stack.enter_context(open_detector(onnx, region=MODES[m], **opts)) for m in cfg.modes}
        alone = stack.enter_context(Detector.open(onnx, **opts))
        if used is not None:
            choice = getattr(alone, "auto_choice", None)
            used.update(backend=alone.backend.name, streams=alone.backend.slots, batch=alone.batch_size,
                        auto=choice.describe() if choice is not None else None)
        x = np.random.default_rng(0).standard_normal((alone.batch_size, 3, cfg.image_size, cfg.image_size))
        call, per_call = steady_state(alone.backend, x.astype(alone.preprocess.dtype))
        calls = {w: max(1, -(-len(files) // per_call)) for w, files in sets.items()}
        for w, files in sets.items():  # warm-up, and every file must decode
            for det in dets.values():
                errors = [r.error for r in det.predict(files) if r.error]
                if errors:
                    raise ConfigError(f"{len(errors)} image(s) of workload {w} failed, e.g. {errors[0]}")
                for _ in range(cfg.warmup - 1):
                    det.predict(files)
            for _ in range(cfg.warmup):
                call()
        for _ in range(cfg.repeats):
            for w, files in sets.items():
                timed((w, "alone"), lambda w=w: [call() for _ in range(calls[w])])
                for m, det in dets.items():
                    timed((w, m), lambda det=det, files=files: det.predict(files))
    out: dict[str, dict[str, Any]] = {}
    for w, files in sets.items():
        n_alone = calls[w] * per_call
        out[w] = {"batch": alone.batch_size, "model_alone": {"img_s": n_alone / best[(w, "alone")],
                                  "ms_per_image": 1e3 * best[(w, "alone")] / n_alone},
                  "e2e": {m: {"img_s": len(files) / best[(w, m)], "wall_ms_per_image": 1e3 * best[(w, m)] / len(files)}
                          for m in cfg.modes}}
    return out


class _Chain:
    """The pipeline's stages, one thread: each timed alone, and the whole chain timed at once."""

    def __init__(self, onnx: Path, files: list[str], cfg: RealWorldConfig):
        from ferret_runtime.backends import backend_for

        batch = {} if cfg.batch is None else {"batch_size": cfg.batch}
        with Detector.open(onnx, crop=cfg.image_size, **batch) as det:
            self.pre: Preprocess = det.preprocess
            self.lpd = det.external_lpd
            self.max_pixels = det.max_pixels
            self.batch = det.batch_size
        self.backend = backend_for(onnx)(onnx, device="cpu", threads=1, streams=1)  # one core
        self.files, self.buf = files, None

    def close(self) -> None:
        self.backend.close()

    def read(self, path: str) -> bytes:
        return Path(path).read_bytes()

    def decode(self, data: bytes, name: str, region: bool) -> np.ndarray:
        return LOAD_PREPARED(data, self.pre, name, max_pixels=self.max_pixels, region=region)

    def preprocess(self, crops: list[np.ndarray]) -> np.ndarray:
        u8 = np.stack(crops)
        shape = (u8.shape[0], 3, u8.shape[1], u8.shape[2])
        if self.buf is None or self.buf.shape != shape:
            self.buf = np.empty(shape, np.float32)
        x = normalize(u8, self.pre.mean, self.pre.std, out=self.buf)
        if self.lpd:
            x = median_residual(x)
        return x if self.pre.dtype == "float32" else x.astype(self.pre.dtype)

    def model(self, x: np.ndarray) -> Any:
        return self.backend.run(x)

    def batches(self) -> list[list[str]]:
        return [self.files[i : i + self.batch] for i in range(0, len(self.files), self.batch)]

    def staged(self) -> dict[str, float]:
        """Seconds per stage over every file, each stage of a batch timed on its own."""
        t = dict.fromkeys(("read", "decode_crop_region", "decode_crop_full", "preprocess", "model"), 0.0)
        for names in self.batches():
            t0 = time.perf_counter()
            data = [self.read(p) for p in names]
            t1 = time.perf_counter()
            crops = [self.decode(d, p, True) for d, p in zip(data, names)]
            t2 = time.perf_counter()
            [self.decode(d, p, False) for d, p in zip(data, names)]
            t3 = time.perf_counter()
            x = self.preprocess(crops)
            t4 = time.perf_counter()
            self.model(x)
            t5 = time.perf_counter()
            for k, dt in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                t[k] += dt
        return t

    def whole(self, region: bool) -> float:
        """Seconds for the chain over every file, timed as a whole (no timer between stages)."""
        t0 = time.perf_counter()
        for names in self.batches():
            self.model(self.preprocess([self.decode(self.read(p), p, region) for p in names]))
        return time.perf_counter() - t0


def spaced(files: list[str], k: int) -> list[str]:
    """At most ``k`` of ``files``, evenly spaced: a mixed workload keeps its proportions."""
    if len(files) <= k:
        return files
    return [files[int(i * len(files) / k)] for i in range(k)]


def measure_split(onnx: Path, files: list[str], cfg: RealWorldConfig) -> tuple[dict[str, float], dict[str, float]]:
    """(core-ms per image per stage, best over repeats; the whole chain's ms per image per mode), on
    ``cfg.split_files`` of the files."""
    files = spaced(files, cfg.split_files)
    chain = _Chain(onnx, files, cfg)
    try:
        for _ in range(max(cfg.warmup, 1)):
            chain.staged()
        runs = [chain.staged() for _ in range(cfg.repeats)]
        split = {k: 1e3 * min(r[k] for r in runs) / len(files) for k in runs[0]}
        serial = {mode: 1e3 * min(chain.whole(region) for _ in range(cfg.repeats)) / len(files)
                  for mode, region in MODES.items()}
    finally:
        chain.close()
    return split, serial


def stage_sum(split: dict[str, float], mode: str) -> float:
    """The stages' core-ms per image for one mode: read + decode+crop (that mode's) + preprocess + model."""
    return split["read"] + split[f"decode_crop_{mode}"] + split["preprocess"] + split["model"]


def export_model(name: str, size: int, tmp: Path) -> tuple[Path, int]:
    """A random-weights FerretNet exported to ONNX at ``size`` (fixed input), and its multiply-adds per image."""
    import torch

    from ferret_export.onnx.export import export_onnx
    from ferret_export.onnx.graph import GraphOptions
    from ferret_train import create_model
    from ferret_train.checkpoint import save_checkpoint
    from ferret_train.models.peers import FLOPS_PER_MAC, count_flops

    if not name.startswith("ferretnet"):
        raise ConfigError(f"Received model {name!r}; --workload runs the Detector, which serves FerretNet models")
    torch.manual_seed(0)
    model = create_model(name).eval()
    ckpt = save_checkpoint(tmp / f"{name}.pth", model)
    out = tmp / f"{name}.onnx"
    export_onnx(ckpt, out, GraphOptions(input_size=size, dynamic_hw=False), run_verify=False, log=lambda *_: None)
    return out, int(count_flops(model, size) // FLOPS_PER_MAC)


def describe_files(w: Workload) -> tuple[float, dict[str, int]]:
    from PIL import Image

    formats: Counter[str] = Counter()
    for f in w.files:
        with Image.open(f) as im:
            formats[f"{im.format} {im.width}x{im.height}"] += 1
    return w.total_bytes() / len(w.files) / 1e6, dict(sorted(formats.items()))


def goals(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's goals per model and decode mode: measured ratio, least ratio, met or not."""
    out = []
    by = {(r["model"], r["workload"]): r for r in results}
    for model in dict.fromkeys(r["model"] for r in results):
        for num, den, least in GOALS:
            for mode in MODES:
                a, b = by.get((model, num)), by.get((model, "crop256" if den == "model" else den))
                if a is None or b is None or mode not in a["e2e"] or (den != "model" and mode not in b["e2e"]):
                    continue
                top = a["e2e"][mode]["img_s"]
                bottom = a["model_alone"]["img_s"] if den == "model" else b["e2e"][mode]["img_s"]
                what = f"{num} e2e / " + ("model alone" if den == "model" else f"{den} e2e")
                out.append({"model": model, "mode": mode, "goal": what, "least": least, "ratio": top / bottom,
                            "met": top / bottom >= least})
    return out


def run_realworld(cfg: RealWorldConfig, log: Callable[[str], None] = print,
                  progress: Callable[[], None] | None = None) -> dict[str, Any]:
    """Measure every (model, workload); returns the JSON record (see SCHEMA)."""
    import tempfile

    from ferret_export.bench.run import check_names, hardware

    check_names("workload", cfg.workloads, WORKLOADS, " or all")
    check_names("decode mode", cfg.modes, MODES)
    if min(cfg.batch or 1, cfg.repeats, cfg.count or 1) < 1 or cfg.warmup < 0:
        raise ConfigError(f"Received batch {cfg.batch}, repeats {cfg.repeats}, warmup {cfg.warmup}, count "
                          f"{cfg.count}; expected positive numbers (warmup >= 0)")
    root = Path(cfg.root) if cfg.root else None
    sets = {w: build(w, cfg.count, scale=cfg.scale, root=root) for w in cfg.workloads}
    hw = hardware()
    peak = fma_peak_record()
    models, results = [], []
    with tempfile.TemporaryDirectory(prefix="ferret-realworld-") as tmp:
        for name in cfg.models:
            onnx, macs = export_model(name, cfg.image_size, Path(tmp))
            row: dict[str, Any] = {"model": name, "macs_per_image": macs, "image_size": cfg.image_size}
            models.append(row)
            t0 = time.perf_counter()
            timed = measure_rounds(onnx, {w: [str(f) for f in ws.files] for w, ws in sets.items()}, cfg, row)
            log(f"[bench] {name}: {cfg.repeats} round(s) of every workload in {time.perf_counter() - t0:.0f} s; "
                f"the split next, on {cfg.split_files} files per workload")
            for wname, w in sets.items():
                files = [str(f) for f in w.files]
                mb, formats = describe_files(w)
                r = Result(name, wname, len(files), mb, formats, **timed[wname])
                r.split_ms, r.serial_ms = measure_split(onnx, files, cfg)
                results.append(asdict(r))
                log(f"[bench] {name} {wname:<10} " + ", ".join(f"e2e {m} {e['img_s']:.1f} img/s" for m, e in
                                                              r.e2e.items()) +
                    f", model alone {r.model_alone['img_s']:.1f} img/s")
                progress and progress()
            alone = [r["model_alone"]["img_s"] for r in results if r["model"] == name]
            row["model_alone_img_s"] = float(np.median(alone))
            if peak and "macs_per_s" in peak:
                row["fraction_of_fma_peak"] = row["model_alone_img_s"] * macs / peak["macs_per_s"]
    return {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_name(hw),
            "hardware": hw, "fma_peak": peak, "decoders": DECODERS, "config": asdict(cfg), "stages": list(STAGES),
            "models": models, "results": results, "goals": goals(results)}
