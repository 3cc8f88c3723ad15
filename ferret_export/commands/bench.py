"""``ferret bench``: the paper's efficiency table, measured on this machine."""

from __future__ import annotations

import argparse
from pathlib import Path

from ferret_runtime.commands import add_streams_argument

HELP = "measure params, FLOPs and throughput of FerretNet and its peers across backends (the paper's table)"


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"received {text!r}; expected comma-separated integers, e.g. 1,8,32") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def register(sub: argparse._SubParsersAction) -> None:
    from ferret_export.bench.run import BACKENDS, DEFAULT_MODELS
    from ferret_export.bench.workload import DEFAULT_COUNTS, SETS, WORKLOADS

    p = sub.add_parser(
        "bench", help=HELP,
        description=HELP + ". Each cell: warm-up batches, then timed batches (CUDA events on a GPU); "
        "median and IQR of images/s, p50/p99 latency per batch. Backends that cannot run here are listed as skipped, "
        "with the reason.", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Backends:\n" + "\n".join(f"  {k:<16} {v}" for k, v in BACKENDS.items()) +
               "\n\nWorkloads (--workload; generated once, cached):\n" +
               "\n".join(f"  {k:<16} {v}" for k, v in SETS.items()) +
               "\n\nOutputs in --out: table.txt (the paper-shaped table and the sweep), bench.json (every cell, the "
               "hardware and library versions), throughput.png and latency.png.\n"
               "Examples:\n  ferret bench                                    # CPU defaults, a few minutes\n"
               "  ferret bench --device cuda --batch-sizes 1,8,32,64,128,256 --iters 50 --warmup 10 "
               "--backends torch,torch-compile,onnxruntime,pipeline\n"
               "  ferret bench --workload all                     # camera photos to crops, end to end (CPU: ~15 min)",
    )
    p.add_argument("--models", type=_names, default=None, metavar="A,B",
                   help=f"registered models (default: {','.join(DEFAULT_MODELS)}; with --workload: "
                        "ferretnet-b,ferretnet-s)")
    p.add_argument("--backends", type=_names, default=None, metavar="A,B",
                   help="backends to time (default: torch-reference,torch,onnxruntime,pipeline,tensorrt-fp16; "
                        "'all' for every one)")
    p.add_argument("--batch-sizes", type=_ints, default=None, metavar="1,8",
                   help="batch sizes to sweep (default: 1,8 on CPU; 1,8,32,64,128,256 on GPU)")
    p.add_argument("--image-size", type=int, default=256, help="square input size (the paper: 256)")
    p.add_argument("--warmup", type=int, default=None, help="untimed batches per cell (default: 1 CPU, 10 GPU)")
    p.add_argument("--iters", type=int, default=None, help="timed batches per cell (default: 5 CPU, 50 GPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch and ONNX Runtime (default: all)")
    add_streams_argument(p)
    p.add_argument("--out", default=None, help="output folder (default: runs/bench, runs/bench2, ...)")
    g = p.add_argument_group(
        "real-world workloads (--workload)",
        "Instead of the paper's table: FerretNet through the whole Detector (ONNX Runtime, its defaults) on "
        "generated files like users' own, end to end vs the model alone, and the time per image by stage (read, "
        "decode + crop with and without region decoding, preprocess, model). Files are generated once, "
        "deterministically, and cached. Writes realworld.json, realworld.txt and realworld.png to --out.")
    g.add_argument("--workload", choices=(*WORKLOADS, "all"), default=None,
                   help="; ".join(f"{k}: {v}" for k, v in SETS.items()) + "; all: every one")
    g.add_argument("--count", type=int, default=None, metavar="N",
                   help="files per set (default: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_COUNTS.items()) + ")")
    g.add_argument("--scale", type=float, default=1.0, help="generated sizes times this, for a quick run (default 1)")
    g.add_argument("--region", choices=("both", "on", "off"), default="both",
                   help="decode + crop with region decoding, the full decode, or both (default)")
    g.add_argument("--workload-dir", default=None,
                   help="where generated files are cached (default: $FERRET_WORKLOAD_DIR or ~/.cache/ferret/"
                        "bench-workload)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ferret_export.bench.report import default_out_dir, main_log, paper_table, sweep_table, write_outputs
    from ferret_export.bench.run import BACKENDS, DEFAULT_MODELS, BenchConfig, resolve_device, run_bench

    if args.workload:
        return run_workload(args)
    args.models = args.models or DEFAULT_MODELS
    device = resolve_device(args.device)
    gpu = device.startswith("cuda")
    backends = tuple(BACKENDS) if args.backends == ("all",) else (args.backends or BenchConfig.backends)
    cfg = BenchConfig(models=args.models, backends=backends,
                      batch_sizes=args.batch_sizes or ((1, 8, 32, 64, 128, 256) if gpu else (1, 8)),
                      image_size=args.image_size, warmup=args.warmup if args.warmup is not None else (10 if gpu else 1),
                      iters=args.iters if args.iters is not None else (50 if gpu else 5), device=device,
                      threads=args.threads, streams=args.streams)
    from tqdm import tqdm

    total = len(cfg.models) * len(cfg.backends) * len(cfg.batch_sizes)
    with tqdm(total=total, unit="cell", disable=None, leave=False) as bar:
        record = run_bench(cfg, log=main_log, progress=lambda: bar.update(1))
    out = Path(args.out) if args.out else default_out_dir()
    files = write_outputs(record, out)
    print(paper_table(record))
    print()
    print(sweep_table(record))
    print(f"\n[bench] wrote {', '.join(str(f) for f in files)}")
    return 0


def run_workload(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ferret_export.bench.e2e import RealWorldConfig, run_realworld
    from ferret_export.bench.report import default_out_dir, main_log, realworld_table, write_realworld
    from ferret_export.bench.workload import names
    from ferret_runtime.errors import ConfigError

    if args.device not in ("auto", "cpu"):
        raise ConfigError(f"Received --device {args.device} with --workload; the real-world run measures the CPU "
                          "pipeline (expected auto or cpu)")
    if not 0 < args.scale <= 1:
        raise ConfigError(f"Received --scale {args.scale}; expected a number in (0, 1]")
    cfg = RealWorldConfig(workloads=names(args.workload), count=args.count, scale=args.scale,
                          batch=args.batch_sizes[0] if args.batch_sizes else None,
                          repeats=args.iters if args.iters is not None else RealWorldConfig.repeats,
                          warmup=args.warmup if args.warmup is not None else RealWorldConfig.warmup,
                          image_size=args.image_size, threads=args.threads, streams=args.streams,
                          modes={"both": ("region", "full"), "on": ("region",), "off": ("full",)}[args.region],
                          root=args.workload_dir)
    if args.models:
        cfg.models = args.models
    with tqdm(total=len(cfg.models) * len(cfg.workloads), unit="workload", disable=None, leave=False) as bar:
        record = run_realworld(cfg, log=main_log, progress=lambda: bar.update(1))
    out = Path(args.out) if args.out else default_out_dir()
    files = write_realworld(record, out)
    print(realworld_table(record))
    print(f"\n[bench] wrote {', '.join(str(f) for f in files)}")
    return 0
