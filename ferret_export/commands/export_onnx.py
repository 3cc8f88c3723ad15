"""``ferret export onnx``: a checkpoint to a verified ONNX model (fp32, fp16 or INT8 Q/DQ)."""

from __future__ import annotations

import argparse

from ferret_export.commands._int8 import add_int8_arguments, int8_options, precision
from ferret_runtime.commands import HelpFormatter

HELP = "ONNX with standard operators only (ONNX Runtime, TensorRT's parser, any consumer)"


def add_parser(formats: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``onnx`` format to ``ferret export``'s subcommands."""
    o = formats.add_parser(
        "onnx", help=HELP, formatter_class=HelpFormatter,
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
    o.add_argument("--threshold", type=float, default=None,
                   help="decision threshold stored in the metadata (default: the checkpoint's calibrated one, "
                        "from 'ferret calibrate', else 0.5)")
    add_int8_arguments(o, "post-training static quantisation: int8 per-channel weights and calibrated per-tensor "
                          "activations; the LPD, the residual and the first --int8-float-layers convolutions stay "
                          "float32. Needs --calib-data")
    o.add_argument("--lpd-func", default=None, help="LPD function for checkpoints that do not record it")
    o.add_argument("--window", type=int, default=None, help="LPD window for checkpoints that do not record it")
    o.set_defaults(func=run)
    return o


def run(args: argparse.Namespace) -> int:
    from ferret_export.onnx.graph import GraphOptions
    from ferret_export.pipeline import check_request, to_onnx

    int8 = int8_options(args)
    check_request("onnx", precision=precision(args), lpd=args.lpd, int8=int8, fp16=args.fp16)
    opts = GraphOptions(opset=args.opset, fp16=args.fp16, dynamic_batch=args.dynamic, dynamic_hw=args.dynamic_hw,
                        input_size=args.input_size, preprocess=args.preprocess, lpd=args.lpd)
    to_onnx(args.weights, args.out, opts, int8, verify_images=args.verify_images, lpd_func=args.lpd_func,
            window_size=args.window, run_verify=args.verify, simplify=args.simplify, threshold=args.threshold)
    return 0
