"""What users run: camera JPEGs (12 Mpx), 12-Mpx PNGs, generator outputs (1024²/2048² PNG, WebP, JPEG), 256² PNG
crops and a mix, through the whole Detector, with region decoding and without, beside the model alone.

``make bench`` times FerretNet-S (ONNX Runtime, its defaults) on 8 files per set at full size, side by side per
workload; the generated files are cached (``ferret_export.bench.workload``). Under ``make test`` (benchmarks
disabled) each body runs once on 2 files per set at a tenth of the size, as a smoke test. The whole measurement,
with the per-stage split and a plot: ``ferret bench --workload all``.
"""

import numpy as np
import pytest

from ferret_export.bench.e2e import LOAD_PREPARED, open_detector
from ferret_export.bench.runners import steady_state
from ferret_export.bench.workload import WORKLOADS, build
from ferret_runtime import Detector

SIZE, BATCH = 256, 16


@pytest.fixture(scope="module")
def onnx(tmp_path_factory):
    from ferret_export.bench.e2e import export_model

    path, _ = export_model("ferretnet-s", SIZE, tmp_path_factory.mktemp("realworld"))
    return path


@pytest.fixture(scope="module")
def files(request, tmp_path_factory):
    """Per workload, its files: full size under make bench, small under make test (benchmarks disabled)."""
    timed = request.config.getoption("benchmark_enable", False) and not request.config.getoption(
        "benchmark_disable", False)
    kw = {"count": 8, "scale": 1.0} if timed else {"count": 2, "scale": 0.1, "root": tmp_path_factory.mktemp("wl")}
    return {w: [str(f) for f in build(w, progress=False, **kw).files] for w in WORKLOADS}


@pytest.mark.parametrize("region", [True, False], ids=["region", "full"])
@pytest.mark.parametrize("workload", WORKLOADS)
def bench_e2e(benchmark, onnx, files, workload, region):
    """Detector.predict on the workload's paths: read, decode + crop on the pool, normalise, ONNX Runtime."""
    benchmark.group = f"ferretnet-s {workload}: e2e vs decode alone vs model alone"
    paths = files[workload]
    with open_detector(onnx, region=region, crop=SIZE, batch_size=BATCH) as det:
        results = benchmark.pedantic(det.predict, (paths,), rounds=3, warmup_rounds=1)
    assert [r.error for r in results] == [None] * len(paths)


@pytest.mark.parametrize("region", [True, False], ids=["region", "full"])
@pytest.mark.parametrize("workload", WORKLOADS)
def bench_decode_crop(benchmark, onnx, files, workload, region):
    """Decode + centre crop of every file on one thread (load_prepared), from bytes already read."""
    benchmark.group = f"ferretnet-s {workload}: e2e vs decode alone vs model alone"
    with Detector.open(onnx, crop=SIZE) as det:
        pre, max_pixels = det.preprocess, det.max_pixels
    data = [open(p, "rb").read() for p in files[workload]]
    crops = benchmark.pedantic(lambda: [LOAD_PREPARED(d, pre, max_pixels=max_pixels, region=region) for d in data],
                               rounds=3, warmup_rounds=1)
    assert all(c.shape == (SIZE, SIZE, 3) for c in crops)


def bench_model_alone(benchmark, onnx):
    """The Detector's backend on ready float32 batches, every slot in flight: the ceiling of every row above."""
    benchmark.group = "ferretnet-s model alone"
    with Detector.open(onnx, crop=SIZE, batch_size=BATCH) as det:
        x = np.random.default_rng(0).standard_normal((BATCH, 3, SIZE, SIZE)).astype(np.float32)
        call, per_call = steady_state(det.backend, x)
        benchmark.pedantic(call, rounds=3, warmup_rounds=1)
    assert per_call >= BATCH
