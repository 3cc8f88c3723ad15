"""CPU throughput streams, side by side in one run: FerretNet-B through the whole ``ferret detect``
pipeline against the original code's eager PyTorch.

Run fully: ``python -m benchmarks.bench_streams [--model ferretnet-b] [--images 128] [--out DIR]``
(writes ``streams-b<batch>.json`` under ``benchmarks/results/cpu-<cores>c/``). Under pytest (CI) the same code
runs once on a few small images, as a smoke test.

Rows, all at batch ``--batch`` on the same random-weight model and the same images:
- original: the authors' eager PyTorch (unfold + median LPD), all cores;
- ONNX Runtime alone on normalised batches: one session with every thread, then ``streams``
  sessions of one thread each, one batch per session in flight (``bench_runners.steady_state``);
- pipeline: ``Detector`` over the PNG files on disk (decode, crop, normalise, run: what
  ``ferret detect`` does, without printing), with one stream and with the default streams.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.bench_pipeline import best_rate
from ferret_export.bench.runners import steady_state
from ferret_runtime import Detector
from ferret_runtime.backends.onnxruntime import OrtBackend, cpu_cores, default_streams
from ferret_runtime.preprocess import load_image, normalize
from ferret_runtime.samples import natural_image


def _setup(model: str, tmp: Path, size: int, n_images: int) -> tuple[Path, Path, list[Path]]:
    import torch

    from ferret_export.onnx.export import export_onnx
    from ferret_export.onnx.graph import GraphOptions
    from ferret_train import create_model
    from ferret_train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp / f"{model}.pth", create_model(model).eval())
    export_onnx(ckpt, tmp / f"{model}.onnx", GraphOptions(input_size=size), run_verify=False, log=lambda *_: None)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n_images):
        paths.append(tmp / f"{i:04d}.png")
        Image.fromarray(natural_image(rng, size)).save(paths[-1])
    return ckpt, tmp / f"{model}.onnx", paths


def _original(ckpt: Path, model: str, batches: list[np.ndarray], repeats: int, threads: int) -> float:
    import torch

    from ferret_train import create_model

    net = create_model(model, lpd_impl="reference").eval()  # the original unfold + median LPD
    net.load_state_dict(torch.load(ckpt, weights_only=True)["model"])
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            return best_rate(sum(len(b) for b in batches), lambda: [net(torch.from_numpy(b)) for b in batches], repeats)
    finally:
        torch.set_num_threads(old)


def _ort_alone(onnx_path: Path, batches: list[np.ndarray], streams: int, repeats: int, threads: int) -> float:
    with OrtBackend(onnx_path, device="cpu", threads=threads, streams=streams) as be:
        call, per_call = steady_state(be, batches[0])
        calls = max(1, len(batches) * len(batches[0]) // per_call)
        return best_rate(calls * per_call, lambda: [call() for _ in range(calls)], repeats)


def _pipeline(onnx_path: Path, paths: list[Path], batch: int, streams: int, repeats: int, threads: int) -> float:
    with Detector.open(onnx_path, device="cpu", batch_size=batch, threads=threads, streams=streams) as det:
        return best_rate(len(paths), lambda: list(det.predict_iter(paths)), repeats)


def run(model: str = "ferretnet-b", n_images: int = 128, size: int = 256, batch: int = 32, repeats: int = 2,
        original_images: int | None = None) -> dict:
    threads, streams = cpu_cores(), default_streams()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, onnx_path, paths = _setup(model, Path(tmp), size, n_images)
        u8 = np.stack([load_image(p) for p in paths])
        batches = [normalize(u8[i : i + batch]) for i in range(0, len(u8), batch)]
        n_orig = original_images or n_images
        rows = {
            "original_eager": _original(ckpt, model, batches[: max(1, n_orig // batch)], repeats, threads),
            "onnxruntime_1_stream": _ort_alone(onnx_path, batches, 1, repeats, threads),
            f"onnxruntime_{streams}_streams": _ort_alone(onnx_path, batches, streams, repeats, threads),
            "pipeline_1_stream": _pipeline(onnx_path, paths, batch, 1, repeats, threads),
            f"pipeline_{streams}_streams": _pipeline(onnx_path, paths, batch, streams, repeats, threads),
        }
    from ferret_export.bench.run import hardware

    base = rows["original_eager"]
    return {"model": model, "image_size": size, "batch": batch, "images": n_images, "threads": threads,
            "default_streams": streams, "img_s": rows, "vs_original": {k: v / base for k, v in rows.items()},
            "hardware": hardware()}


def bench_streams_smoke():
    """CI: the whole measurement on a few small images (numbers not asserted: shared machines are noisy)."""
    rec = run(model="ferretnet-s", n_images=8, size=64, batch=4, repeats=1)
    assert len(rec["img_s"]) == 5 and all(v > 0 for v in rec["img_s"].values())
    assert rec["vs_original"]["original_eager"] == 1.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ferretnet-b")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--original-images", type=int, default=64, help="images the slow original row times")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None,
                    help="folder for streams-b<batch>.json (default: benchmarks/results/cpu-<cores>c)")
    a = ap.parse_args()
    rec = run(a.model, a.images, a.size, a.batch, a.repeats, a.original_images)
    out = Path(a.out) if a.out else Path(__file__).parent / "results" / f"cpu-{os.cpu_count()}c"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"streams-b{a.batch}.json"
    path.write_text(json.dumps(rec, indent=2))
    print(f"{rec['model']} {rec['image_size']}px, batch {rec['batch']}, {rec['threads']} cores, "
          f"default {rec['default_streams']} streams")
    for k, v in rec["img_s"].items():
        print(f"{k:<24} {v:7.1f} img/s  {rec['vs_original'][k]:5.2f}x the original")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
