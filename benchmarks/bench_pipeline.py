"""End-to-end runtime throughput vs the backend alone, where the time goes, and serve latency.

Run fully: ``python -m benchmarks.bench_pipeline [--model ferretnet-s] [--images 256] [--out DIR]``
(writes ``pipeline.json`` under ``benchmarks/results/<device>/``). Under pytest (CI) the same code
runs once on a handful of images, as a smoke test.

Measured in one run, on the same images:
- backend alone: ONNX Runtime on already-normalised float32 batches (the ceiling);
- pipeline: ``Detector.predict`` on encoded PNG bytes (decode on the thread pool, crop,
  normalise into the reused buffer, run), i.e. what a service gets;
- the parts on their own: decode (Pillow, one thread), normalise, inference;
- ``ferret serve`` on 127.0.0.1: request latency p50/p99 with 1, 8 and 64 concurrent clients.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from ferret_export.bench.runners import steady_state
from ferret_runtime import Detector
from ferret_runtime.backends.onnxruntime import OrtBackend
from ferret_runtime.preprocess import load_image, normalize
from ferret_runtime.samples import natural_image


def _export(model: str, tmp: Path, size: int) -> Path:
    import torch

    from ferret_export.onnx.export import export_onnx
    from ferret_export.onnx.graph import GraphOptions
    from ferret_train import create_model
    from ferret_train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp / f"{model}.pth", create_model(model).eval())
    export_onnx(ckpt, tmp / f"{model}.onnx", GraphOptions(input_size=size), run_verify=False, log=lambda *_: None)
    return tmp / f"{model}.onnx"


def _images(n: int, size: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(natural_image(rng, size)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def best_rate(n: int, fn, repeats: int) -> float:
    """Best-of-``repeats`` images/s for fn() processing n images (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n / best


def measure_throughput(onnx_path: Path, images: list[bytes], batch: int, threads: int, repeats: int) -> dict:
    decoded = [load_image(b) for b in images]
    u8 = np.stack(decoded)
    batches = [normalize(u8[i : i + batch]) for i in range(0, len(u8), batch)]
    n = len(images)
    with OrtBackend(onnx_path, threads=threads) as be:  # the default CPU streams, batches in flight
        call, per_call = steady_state(be, batches[0])
        calls = max(1, n // per_call)
        backend = best_rate(calls * per_call, lambda: [call() for _ in range(calls)], repeats)
    with Detector.open(onnx_path, batch_size=batch, threads=threads, workers=max(2, threads)) as det:
        pipeline = best_rate(n, lambda: det.predict(images), repeats)
    decode = best_rate(n, lambda: [load_image(b) for b in images], repeats)
    out = np.empty((batch, 3) + u8.shape[1:3], np.float32)
    prep = best_rate(n, lambda: [normalize(u8[i : i + batch], out=out[: len(u8[i : i + batch])])
                                 for i in range(0, n, batch)],
                 repeats)
    return {"images": n, "batch": batch, "backend_img_s": backend, "pipeline_img_s": pipeline,
            "pipeline_vs_backend": pipeline / backend,
            "parts_ms_per_image": {"decode_png_1_thread": 1e3 / decode, "normalise": 1e3 / prep,
                                   "inference": 1e3 / backend}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_serve(onnx_path: Path, images: list[bytes], clients: list[int], requests_per_client: int) -> dict:
    import httpx

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ferret_runtime.cli", "serve", "-m", str(onnx_path), "--port",
                             str(port), "--log-level", "warning", "--max-queue", "4096"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError("ferret serve did not become ready")
            time.sleep(0.1)
        results = {}
        for c in clients:
            with httpx.Client(base_url=url, timeout=300, limits=httpx.Limits(max_connections=c)) as client:
                def one(i: int) -> float:
                    t0 = time.perf_counter()
                    r = client.post("/v1/detect", content=images[i % len(images)])
                    r.raise_for_status()
                    return time.perf_counter() - t0

                total = c * requests_per_client
                with ThreadPoolExecutor(c) as pool:
                    list(pool.map(one, range(min(c, total))))  # warm the connections
                    t0 = time.perf_counter()
                    lat = list(pool.map(one, range(total)))
                    wall = time.perf_counter() - t0
            p50, p99 = np.percentile(np.array(lat) * 1e3, [50, 99])
            results[str(c)] = {"requests": total, "p50_ms": float(p50), "p99_ms": float(p99), "img_s": total / wall}
        return results
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def run(model: str = "ferretnet-s", n_images: int = 256, size: int = 256, batch: int = 32, threads: int | None = None,
        repeats: int = 3, clients: tuple[int, ...] = (1, 8, 64), requests_per_client: int = 16) -> dict:
    threads = threads or os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = _export(model, Path(tmp), size)
        images = _images(n_images, size)
        record = {"model": model, "image_size": size, "device": "cpu", "threads": threads,
                  "throughput": measure_throughput(onnx_path, images, batch, threads, repeats),
                  "serve": measure_serve(onnx_path, images, list(clients), requests_per_client)}
    from ferret_export.bench.run import hardware

    record["hardware"] = hardware()
    return record


def bench_pipeline_smoke(tmp_path):
    """CI: the whole measurement on a few images (numbers not asserted: shared machines are noisy)."""
    pytest = __import__("pytest")
    pytest.importorskip("httpx")
    rec = run(n_images=4, size=64, batch=2, threads=1, repeats=1, clients=(1, 2), requests_per_client=2)
    t = rec["throughput"]
    assert t["backend_img_s"] > 0 and t["pipeline_img_s"] > 0
    assert set(t["parts_ms_per_image"]) == {"decode_png_1_thread", "normalise", "inference"}
    assert set(rec["serve"]) == {"1", "2"} and rec["serve"]["2"]["p99_ms"] >= rec["serve"]["2"]["p50_ms"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ferretnet-s")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--requests-per-client", type=int, default=16)
    ap.add_argument("--out", default=None, help="folder for pipeline.json (default: benchmarks/results/cpu-<cores>c)")
    a = ap.parse_args()
    rec = run(a.model, a.images, a.size, a.batch, a.threads, requests_per_client=a.requests_per_client)
    out = Path(a.out) if a.out else Path(__file__).parent / "results" / f"cpu-{os.cpu_count()}c"
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline.json").write_text(json.dumps(rec, indent=2))
    t = rec["throughput"]
    print(f"{rec['model']} {rec['image_size']}px, batch {t['batch']}, {rec['threads']} threads")
    print(f"backend alone {t['backend_img_s']:.1f} img/s, pipeline {t['pipeline_img_s']:.1f} img/s "
          f"({100 * t['pipeline_vs_backend']:.0f}%)")
    print("per image: " + ", ".join(f"{k} {v:.2f} ms" for k, v in t["parts_ms_per_image"].items()))
    for c, s in rec["serve"].items():
        print(f"serve, {c:>2} clients: p50 {s['p50_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms, {s['img_s']:.1f} img/s")
    print(f"wrote {out / 'pipeline.json'}")


if __name__ == "__main__":
    main()
