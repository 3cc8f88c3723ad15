"""``ferret export onnx``: a checkpoint to a verified ONNX model."""

from __future__ import annotations

import argparse

from ferret_runtime.commands import HelpFormatter
from ferret_runtime.errors import ConfigError

HELP = "export a checkpoint to ONNX (verified against PyTorch before it is written)"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help=HELP, description=HELP + ".")
    formats = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    from .export_tensorrt import add_parser as add_tensorrt

    add_tensorrt(formats)
    o = formats.add_parser(
        "onnx", help="ONNX with standard operators only (ONNX Runtime, TensorRT's parser, any consumer)",
        formatter_class=HelpFormatter,
        description="Export a FerretNet checkpoint to ONNX. The LPD becomes standard operators (a median-of-9 "
                    "Min/Max network for 3x3, TopK for larger windows), BatchNorm is folded into the convolutions, "
                    "and ONNX Runtime's output is compared with PyTorch's on real and random inputs before the file "
                    "is written.",
        epilog="Examples:\n  ferret export onnx -w ferretnet-s-median-3.pth -o ferretnet-s.onnx --dynamic-hw\n"
               "  ferret export onnx -w ferretnet-s-median-3.pth -o ferretnet-s.int8.onnx --int8 "
               "--calib-data data/train --calib-images 256",
    )
    o.add_argument("--weights", "-w", required=True, help="checkpoint (.pth/.pt), the authors' format or ours")
    o.add_argument("--out", "-o", required=True, help="output .onnx path (written atomically, only if verified)")
    o.add_argument("--opset", type=int, default=17, help="ONNX opset (17..21)")
    o.add_argument("--dynamic", action=argparse.BooleanOptionalAction, default=True, help="dynamic batch dimension")
    o.add_argument("--dynamic-hw", action="store_true", help="dynamic height and width too (full-size inference)")
    o.add_argument("--input-size", type=int, default=256, help="H = W of the input when not --dynamic-hw "
                   "(and of the verification inputs)")
    o.add_argument("--fp16", action="store_true", help="float16 weights and activations; input, LPD residual and "
                   "output stay float32 (rounding the input first would cost ~30x more accuracy); verified "
                   "within 2e-2 instead of 1e-4")
    o.add_argument("--preprocess", action="store_true", help="fold uint8 NHWC -> normalised float into the graph, "
                   "so a service can feed decoded bytes directly")
    o.add_argument("--lpd", choices=["portable", "plugin", "external"], default="portable",
                   help="'portable': standard ops; 'plugin': one ferret::lpd node for the TensorRT plugin "
                        "(verification then runs the same weights with the portable LPD); 'external': the CNN "
                        "alone, its input the LPD residual, which the ferret runtime computes (on a GPU: decoded "
                        "uint8 -> network input in one kernel, 4x fewer bytes over PCIe; median/3 models only)")
    o.add_argument("--simplify", action="store_true", help="run onnxslim on the graph (pip install onnxslim)")
    o.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="compare ONNX Runtime (CPU) with PyTorch before writing")
    o.add_argument("--verify-images", nargs="+", metavar="PATH", default=None,
                   help="image files/folders for verification (default: generated samples)")
    o.add_argument("--threshold", type=float, default=0.5, help="decision threshold stored in the metadata")
    q = o.add_argument_group("INT8 (a Q/DQ graph calibrated on real images; runs in ONNX Runtime and TensorRT)")
    q.add_argument("--int8", action="store_true", help="post-training static quantisation: int8 per-channel weights and "
                   "calibrated per-tensor activations; the LPD, the residual and the first --int8-float-layers "
                   "convolutions stay float32. Needs --calib-data")
    q.add_argument("--calib-data", nargs="+", metavar="PATH", default=None,
                   help="image files/folders (e.g. a ForenSynths train root) to calibrate on, read through the "
                        "runtime's preprocessing")
    q.add_argument("--calib-images", type=int, default=256, metavar="N", help="images drawn (seeded) from --calib-data")
    q.add_argument("--calib-method", choices=["percentile", "entropy", "minmax"], default="percentile",
                   help="activation ranges: 99.9999th percentile of |x|, KL divergence (TensorRT's entropy "
                        "calibrator), or min/max")
    q.add_argument("--int8-float-layers", type=int, default=2, metavar="K",
                   help="leading Conv layers kept float32 (0 = all int8; the first two read the LPD residual, whose "
                        "signal is in rare large values)")
    q.add_argument("--int8-min-agreement", type=float, default=0.99, metavar="F",
                   help="fail (nothing written) when int8 and fp32 labels agree on fewer than this share of the "
                        "verification images (--verify-images, else the calibration images)")
    o.add_argument("--lpd-func", default=None, help="LPD function for checkpoints that do not record it")
    o.add_argument("--window", type=int, default=None, help="LPD window for checkpoints that do not record it")
    o.set_defaults(func=run_onnx)

    t = formats.add_parser(
        "triton", help="a Triton Inference Server model repository from an exported .onnx or TensorRT engine",
        formatter_class=HelpFormatter,
        description="Write a Triton Inference Server model repository: REPO/NAME/config.pbtxt, REPO/NAME/1/model.onnx "
                    "(platform onnxruntime_onnx) or REPO/NAME/1/model.plan (tensorrt_plan), REPO/NAME/README.md with "
                    "the exact preprocessing, and REPO/client_example.py (tritonclient.http, numpy only). Input names, "
                    "dtypes and shapes are read from the ONNX graph; a TensorRT engine needs its sidecar ENGINE.json "
                    "(written by the TensorRT export). The model's ferret.* metadata goes into the config's parameters.",
        epilog="\nExample:\n  ferret export triton --model ferretnet-s.onnx --repo models --max-batch 64 "
               "--preferred-batch 8,16,32 --instances 2",
    )
    t.add_argument("--model", "-m", required=True, help="exported model: .onnx (from 'ferret export onnx') or a "
                   "TensorRT .engine/.plan with its .json sidecar beside it")
    t.add_argument("--repo", "-r", required=True, help="model repository directory (created if missing; other "
                   "models in it are left alone)")
    t.add_argument("--name", default="ferretnet", help="model name: the directory REPO/NAME and the name clients use")
    t.add_argument("--max-batch", type=int, default=64, help="max_batch_size; needs a dynamic batch dimension "
                   "(0: Triton does not batch and the dims include the batch dimension)")
    t.add_argument("--instances", type=int, default=1, help="model instances (instance_group count) per device")
    t.add_argument("--preferred-batch", type=_batch_sizes, default="8,16,32", metavar="N,N,...",
                   help="dynamic batching preferred_batch_size ('none' for none); sizes above --max-batch are dropped "
                        "from the default, and refused when given")
    t.add_argument("--max-queue-delay-us", type=int, default=500,
                   help="dynamic batching max_queue_delay_microseconds: how long a request may wait for a fuller batch")
    t.add_argument("--kind", choices=["gpu", "cpu"], default="gpu", help="instance_group kind (KIND_GPU/KIND_CPU)")
    t.add_argument("--force", action="store_true", help="replace an existing REPO/NAME (the new one is renamed into "
                   "place whole)")
    t.set_defaults(func=run_triton)


def _batch_sizes(text: str) -> list[int]:
    """'8,16,32' -> [8, 16, 32]; 'none' or '' -> []."""
    if text.strip().lower() in ("", "none"):
        return []
    try:
        sizes = [int(v) for v in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"Received {text!r}; expected comma-separated positive integers, e.g. 8,16,32")
    return sizes


def run_onnx(args: argparse.Namespace) -> int:
    from ..onnx_export import export_onnx
    from ..onnx_graph import GraphOptions

    opts = GraphOptions(opset=args.opset, fp16=args.fp16, dynamic_batch=args.dynamic, dynamic_hw=args.dynamic_hw,
                        input_size=args.input_size, preprocess=args.preprocess, lpd=args.lpd)
    if args.int8:
        return _run_int8(args, opts)
    if args.calib_data:
        raise ConfigError("Received --calib-data without --int8; expected both (calibration is for INT8 graphs)")
    export_onnx(args.weights, args.out, opts, lpd_func=args.lpd_func, window_size=args.window,
                verify_images=args.verify_images, run_verify=args.verify, simplify=args.simplify,
                threshold=args.threshold)
    return 0


def _run_int8(args: argparse.Namespace, opts) -> int:
    """fp32 export (verified against PyTorch) -> calibrated Q/DQ graph -> int8 vs fp32 check -> OUT."""
    import os
    import tempfile
    from pathlib import Path

    from ..onnx_export import export_onnx
    from ..quantize import quantize_int8, select_images, verify_int8
    from ..verify import ParityError

    if args.fp16 or args.lpd != "portable":
        raise ConfigError("Received --int8 with " + ("--fp16" if args.fp16 else f"--lpd {args.lpd}") + "; expected "
                          "neither (INT8 quantises the fp32 portable graph: ONNX Runtime must run it to calibrate)")
    if not args.calib_data:
        raise ConfigError("Received --int8 without --calib-data; expected image files or folders to calibrate on "
                          "(e.g. --calib-data data/train --calib-images 256)")
    if not 0.0 <= args.int8_min_agreement <= 1.0:
        raise ConfigError(f"Received --int8-min-agreement {args.int8_min_agreement}; expected 0..1")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".ferret-int8-", dir=out.parent) as tmp:
        fp32, q = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        export_onnx(args.weights, fp32, opts, lpd_func=args.lpd_func, window_size=args.window,
                    verify_images=args.verify_images, run_verify=args.verify, simplify=args.simplify,
                    threshold=args.threshold)
        res = quantize_int8(fp32, q, args.calib_data, n_images=args.calib_images, method=args.calib_method,
                            float_layers=args.int8_float_layers)
        images = args.verify_images or select_images(args.calib_data, args.calib_images)  # the same seeded draw
        cmp = verify_int8(fp32, q, images)
        if cmp.agreement < args.int8_min_agreement:
            raise ParityError(f"{out}: not written: int8 and fp32 labels agree on {100 * cmp.agreement:.2f}% of "
                              f"{cmp.n} images; expected >= {100 * args.int8_min_agreement:.2f}% (try --calib-method "
                              f"percentile, more --calib-images or a larger --int8-float-layers)")
        os.replace(q, out)  # same directory: atomic, and the file keeps the permissions atomic_write gave it
    print(f"[export] wrote {out} ({out.stat().st_size / 1e6:.2f} MB int8, {res.n_images} calibration images, "
          f"{res.method})")
    return 0



def run_triton(args: argparse.Namespace) -> int:
    from ..triton import DEFAULT_PREFERRED, write_triton_repo

    preferred = None if args.preferred_batch == list(DEFAULT_PREFERRED) else args.preferred_batch
    write_triton_repo(args.model, args.repo, name=args.name, max_batch=args.max_batch, instances=args.instances,
                      preferred_batch=preferred, max_queue_delay_us=args.max_queue_delay_us, kind=args.kind,
                      force=args.force)
    return 0
