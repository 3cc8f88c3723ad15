"""``ferret export tensorrt``: an exported graph (or a checkpoint) to a verified TensorRT engine."""

from __future__ import annotations

import argparse
from pathlib import Path

from ferret_export.commands._int8 import add_int8_arguments, int8_options, precision
from ferret_runtime.commands import HelpFormatter

HELP = "build a TensorRT engine from an exported .onnx or a checkpoint (verified against ONNX Runtime first)"


def _triple(option: str):
    def parse(text: str) -> tuple[int, int, int]:
        from ferret_export.tensorrt.profile import parse_triple
        from ferret_runtime.errors import ConfigError

        try:
            return parse_triple(text, option)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = option.lstrip("-").replace("-", "_")  # argparse names the type in its messages
    return parse


def _lpd(text: str) -> str:
    """--lpd, with 'native' (its old name) read as 'portable'."""
    from ferret_runtime.sidecar import LPD_ALIASES

    return LPD_ALIASES.get(text, text)


def add_parser(formats: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``tensorrt`` format to ``ferret export``'s subcommands."""
    p = _parser(formats)
    _add_build_arguments(p)
    p.add_argument("--lpd", type=_lpd, choices=["portable", "plugin", "external"], default=None,
                   help="'portable': the LPD as standard TensorRT layers ('native' is accepted, its old name); "
                        "'plugin': the fused ferret::lpd CUDA kernel, embedded in the engine as PTX; 'external': the "
                        "CNN alone, the runtime's preprocess_lpd kernel turning uint8 into its input (default: the "
                        "graph's mode with --onnx, portable with --weights)")
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--fp16", action="store_true", help="with --weights only: export a float16 graph (input, LPD "
                      "and logits stay float32); with --onnx the precision is the graph's")
    add_int8_arguments(p, "with --weights only: an INT8 Q/DQ graph, made as 'ferret export onnx --int8' makes it "
                          "(calibrated on --calib-data, held to --int8-min-agreement; --lpd portable); with --onnx "
                          "pass a Q/DQ graph", prec)
    p.add_argument("--input-size", type=int, default=256, help="with --weights only: H = W of the exported graph "
                   "when not --dynamic-hw")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="compare TensorRT with ONNX Runtime (CPU) before writing")
    p.add_argument("--verify-images", nargs="+", metavar="PATH", default=None,
                   help="image files/folders for verification (default: generated samples)")
    p.set_defaults(func=run)
    return p


def _parser(formats: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return formats.add_parser(
        "tensorrt", help=HELP, formatter_class=HelpFormatter,
        description="Build a TensorRT engine for this machine's GPU from a graph written by 'ferret export onnx' "
                    "(--onnx), or export a checkpoint first (--weights). The network is strongly typed: the precision "
                    "is the graph's (float32, float16, or INT8 Q/DQ). Before anything is written, TensorRT's logits "
                    "are compared with ONNX Runtime's (CPU) on real images and random batches at the profile's "
                    "smallest, optimal and largest batch, with max abs/rel errors printed per case. The engine is "
                    "written with a sidecar ENGINE.json (TensorRT version, GPU, profile, preprocessing) that the "
                    "runtime checks before loading: an engine only runs with the TensorRT and on the GPU model it was "
                    "built with.",
        epilog="Examples:\n  ferret export tensorrt --onnx ferretnet-s.onnx -o ferretnet-s.engine --batch 1,32,128 "
               "--timing-cache trt.cache\n"
               "  ferret export tensorrt -w ferretnet-s-median-3.pth -o ferretnet-s-fp16.engine --fp16 --lpd plugin\n"
               "  ferret export tensorrt -w ferretnet-s-median-3.pth -o ferretnet-s-int8.engine "
               "--int8 --calib-data data/train",
    )


def _add_build_arguments(p: argparse.ArgumentParser) -> None:
    """The source, the output and the build's own options."""
    from ferret_export.tensorrt.build import DEFAULT_BATCH, DEFAULT_WORKSPACE_MB

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--onnx", metavar="M", help="graph exported by 'ferret export onnx' (its precision and LPD mode "
                     "decide the engine's)")
    src.add_argument("--weights", "-w", metavar="W", help="checkpoint (.pth/.pt): exported to ONNX in a temporary "
                     "directory with matching options, then built")
    p.add_argument("--out", "-o", required=True, help="output .engine or .plan path; ENGINE.json is written beside it")
    p.add_argument("--batch", type=_triple("--batch"), default=None, metavar="MIN,OPT,MAX",
                   help=f"batch sizes of the optimisation profile: the engine runs MIN..MAX and is tuned for OPT "
                        f"(default: {','.join(map(str, DEFAULT_BATCH))}, or the graph's fixed batch)")
    p.add_argument("--dynamic-hw", type=_triple("--dynamic-hw"), default=None, metavar="MIN,OPT,MAX",
                   help="square image sizes for a graph with dynamic height/width "
                        "(required for one, refused otherwise)")
    p.add_argument("--workspace-mb", type=int, default=DEFAULT_WORKSPACE_MB,
                   help="TensorRT's workspace memory pool limit in MiB (scratch memory tactics may use)")
    p.add_argument("--timing-cache", type=Path, default=None, metavar="FILE",
                   help="TensorRT timing cache: read if it exists, updated after the build, so later builds on this "
                        "GPU and TensorRT skip re-timing layers (default: none)")
    p.add_argument("--hardware-compat", action="store_true",
                   help="build for any Ampere or newer GPU (HardwareCompatibilityLevel.AMPERE_PLUS; may be slower)")


def run(args: argparse.Namespace) -> int:
    from ferret_export.tensorrt.build import build_engine, export_and_build
    from ferret_runtime.errors import ConfigError

    options = dict(batch=args.batch, workspace_mb=args.workspace_mb, timing_cache=args.timing_cache,
                   hardware_compat=args.hardware_compat, verify=args.verify)
    if args.onnx:
        for flag, given in (("--fp16", args.fp16), ("--int8", args.int8), ("--calib-data", args.calib_data is not None),
                            ("--input-size", args.input_size != 256)):
            if given:
                raise ConfigError(f"Received {flag} with --onnx; expected it only with --weights (with --onnx the "
                                  "graph decides: export it with the options you want, "
                                  "e.g. 'ferret export onnx --fp16')")
        build_engine(args.onnx, args.out, dynamic_hw=args.dynamic_hw, lpd=args.lpd, verify_images=args.verify_images,
                     **options)
    else:
        export_and_build(args.weights, args.out, precision=precision(args), input_size=args.input_size,
                         dynamic_hw=args.dynamic_hw, lpd=args.lpd, verify_images=args.verify_images,
                         int8=int8_options(args), **options)
    return 0
