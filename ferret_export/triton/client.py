#!/usr/bin/env python3
"""Classify images with a FerretNet model served by Triton or by `ferret serve` (copied into the repository by `ferret export triton`).

    pip install "tritonclient[http]" numpy pillow
    python client_example.py IMAGE [IMAGE ...] --url localhost:8000 --model NAME

The preprocessing is read from the served model's config (parameter ferret.preprocess), so this
works for every FerretNet model in the repository, and against `ferret serve` (KServe v2), whose
config asks for uint8 pixels and normalises on the server; the constants below, those of the model
it was written for, are the fallback. numpy and Pillow only: no torch, and no ferret package.
"""  # noqa: E501 (the first line is the --help description, kept whole)

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np
from PIL import Image

# The export rewrites these three lines with the exported model's values
# (ferret_export.triton.repository.client_example_text).
MODEL_NAME = 'ferretnet'
PREPROCESS = {'crop': 256, 'mean': [0.48145466, 0.4578275, 0.40821073], 'std': [0.26862954, 0.26130258, 0.27577711], 'layout': 'NCHW', 'dtype': 'float32'}  # noqa: E501
THRESHOLD = 0.5
TRITON_DTYPES = {"float32": "FP32", "float16": "FP16", "uint8": "UINT8"}
CONFIG_DTYPES = {"TYPE_FP32": "float32", "TYPE_FP16": "float16", "TYPE_UINT8": "uint8"}


def load_rgb(path: str) -> np.ndarray:
    """Decode as stored (no EXIF rotation) to uint8 H x W x 3 RGB."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """torchvision CenterCrop: zero-pad a smaller image (extra pixel right/bottom), then crop."""
    h, w = img.shape[:2]
    if h < size or w < size:
        top, left = max(size - h, 0) // 2, max(size - w, 0) // 2
        img = np.pad(img, ((top, max(size - h, 0) - top), (left, max(size - w, 0) - left), (0, 0)))
        h, w = img.shape[:2]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img[top:top + size, left:left + size]


def preprocess(img: np.ndarray, pre: dict = PREPROCESS) -> np.ndarray:
    """One uint8 H x W x 3 RGB image -> one model input, without the batch dimension."""
    if pre.get("crop") is not None:
        img = center_crop(img, int(pre["crop"]))
    if pre["dtype"] == "uint8":  # normalisation is inside the model
        x = img if pre["layout"] == "NHWC" else img.transpose(2, 0, 1)
        return np.ascontiguousarray(x)
    x = img.astype(np.float32) / np.float32(255.0)
    x -= np.asarray(pre["mean"], dtype=np.float32)
    x /= np.asarray(pre["std"], dtype=np.float32)
    if pre["layout"] == "NCHW":
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x.astype(pre["dtype"]))


def logit_scaling(params: dict) -> tuple[float, float]:
    """(a, b) of the model's calibration (``ferret calibrate``: prob_fake = sigmoid(a * logit + b));
    (1, 0) for an uncalibrated model. Read from the ferret.provenance parameter."""
    try:
        scaling = json.loads(params.get("ferret.provenance") or "{}").get("calibration", {}).get("scaling") or {}
    except (ValueError, AttributeError):
        return 1.0, 0.0
    if scaling.get("method") == "temperature":
        return 1.0 / float(scaling["temperature"]), 0.0
    if scaling.get("method") == "platt":
        return float(scaling["a"]), float(scaling["b"])
    return 1.0, 0.0


def served_model(client, model: str) -> tuple[dict, float, str, str, int]:
    """(preprocess, threshold, input name, output name, max_batch_size) from the server's config.

    The image input is the first one of a pixel data type (ferret serve also offers a BYTES input
    of encoded files), the logit output the first floating-point one (it also returns labels)."""
    cfg = client.get_model_config(model)
    params = {k: v.get("string_value") for k, v in (cfg.get("parameters") or {}).items()}
    pre = dict(json.loads(params["ferret.preprocess"]) if params.get("ferret.preprocess") else PREPROCESS)
    inp = next((t for t in cfg["input"] if t.get("data_type") in CONFIG_DTYPES), cfg["input"][0])
    out = next((t for t in cfg["output"] if t.get("data_type") in ("TYPE_FP32", "TYPE_FP16")), cfg["output"][0])
    pre["dtype"] = CONFIG_DTYPES.get(inp.get("data_type"), pre["dtype"])  # e.g. a float16 engine input
    threshold = float(params.get("ferret.threshold") or THRESHOLD)
    pre["scaling"] = logit_scaling(params)
    return pre, threshold, inp["name"], out["name"], int(cfg.get("max_batch_size", 0))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--url", default="localhost:8000", help="HTTP endpoint of Triton or ferret serve (host:port)")
    p.add_argument("--model", default=MODEL_NAME, help="model name in the repository")
    p.add_argument("--batch", type=int, default=8, help="images per request (capped by max_batch_size)")
    args = p.parse_args(argv)

    try:
        import tritonclient.http as httpclient
    except (ImportError, RuntimeError) as e:  # RuntimeError: tritonclient without its [http] extra
        sys.exit(f"this example needs Triton's HTTP client: pip install 'tritonclient[http]' ({e})")

    client = httpclient.InferenceServerClient(url=args.url)
    pre, threshold, in_name, out_name, max_batch = served_model(client, args.model)
    batch = max(1, min(args.batch, max_batch)) if max_batch > 0 else 1
    pending: list[tuple[str, np.ndarray]] = []

    def flush() -> None:
        x = np.stack([a for _, a in pending])
        inp = httpclient.InferInput(in_name, list(x.shape), TRITON_DTYPES[str(x.dtype)])
        inp.set_data_from_numpy(x, binary_data=True)
        res = client.infer(args.model, [inp], outputs=[httpclient.InferRequestedOutput(out_name, binary_data=True)])
        a, b = pre["scaling"]
        for (path, _), logit in zip(pending, res.as_numpy(out_name).reshape(len(pending), -1)[:, 0]):
            z = a * float(logit) + b  # the calibrated logit; "logit" stays the model's
            prob = 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))
            print(json.dumps({"path": path, "logit": float(logit), "prob_fake": prob,
                              "label": "fake" if prob > threshold else "real"}))
        pending.clear()

    failed = 0
    for path in args.images:
        try:
            x = preprocess(load_rgb(path), pre)
        except (OSError, ValueError) as e:
            print(f"{path}: cannot read image ({e})", file=sys.stderr)
            failed += 1
            continue
        if pending and (len(pending) == batch or pending[0][1].shape != x.shape):
            flush()
        pending.append((path, x))
    if pending:
        flush()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
