"""The INT8 options ``ferret export onnx`` and ``ferret export tensorrt`` share, and their reading."""

from __future__ import annotations

import argparse

from ferret_runtime.errors import ConfigError

from ..pipeline import CALIB_METHODS, Int8Options

GROUP = "INT8 (a Q/DQ graph calibrated on real images; runs in ONNX Runtime and TensorRT)"


def add_int8_arguments(p: argparse.ArgumentParser, int8_help: str,
                       precision_group: argparse._MutuallyExclusiveGroup | None = None) -> None:
    """--int8 (with ``int8_help``; in ``precision_group`` where the other precisions exclude it),
    --calib-data/-images/-method, --int8-float-layers, --int8-min-agreement."""
    q = p.add_argument_group(GROUP)
    (precision_group or q).add_argument("--int8", action="store_true", help=int8_help)
    q.add_argument("--calib-data", nargs="+", metavar="PATH", default=None,
                   help="image files/folders (e.g. a ForenSynths train root) to calibrate on, read through the "
                        "runtime's preprocessing")
    q.add_argument("--calib-images", type=int, default=256, metavar="N", help="images drawn (seeded) from --calib-data")
    q.add_argument("--calib-method", choices=list(CALIB_METHODS), default="percentile",
                   help="activation ranges: 99.9999th percentile of |x|, KL divergence (TensorRT's entropy "
                        "calibrator), or min/max")
    q.add_argument("--int8-float-layers", type=int, default=2, metavar="K",
                   help="leading Conv layers kept float32 (0 = all int8; the first two read the LPD residual, whose "
                        "signal is in rare large values)")
    q.add_argument("--int8-min-agreement", type=float, default=0.99, metavar="F",
                   help="fail (nothing written) when int8 and fp32 labels agree on fewer than this share of the "
                        "verification images (--verify-images, else the calibration images)")


def int8_options(args: argparse.Namespace) -> Int8Options | None:
    """The INT8 stage's options with --int8, else None (and calibration data alone is an error)."""
    if not args.int8:
        if args.calib_data:
            raise ConfigError("Received --calib-data without --int8; expected both (calibration is for INT8 graphs)")
        return None
    return Int8Options(args.calib_data, args.calib_images, args.calib_method, args.int8_float_layers,
                       args.int8_min_agreement)


def precision(args: argparse.Namespace) -> str:
    return "int8" if args.int8 else "fp16" if args.fp16 else "fp32"
