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

    p = sub.add_parser(
        "bench", help=HELP,
        description=HELP + ". Each cell: warm-up batches, then timed batches (CUDA events on a GPU); "
        "median and IQR of images/s, p50/p99 latency per batch. Backends that cannot run here are listed as skipped, "
        "with the reason.", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Backends:\n" + "\n".join(f"  {k:<16} {v}" for k, v in BACKENDS.items()) +
               "\n\nOutputs in --out: table.txt (the paper-shaped table and the sweep), bench.json (every cell, the "
               "hardware and library versions), throughput.png and latency.png.\n"
               "Examples:\n  ferret bench                                    # CPU defaults, a few minutes\n"
               "  ferret bench --device cuda --batch-sizes 1,8,32,64,128,256 --iters 50 --warmup 10 "
               "--backends torch,torch-compile,onnxruntime,pipeline",
    )
    p.add_argument("--models", type=_names, default=DEFAULT_MODELS, metavar="A,B",
                   help=f"registered models (default: {','.join(DEFAULT_MODELS)})")
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ferret_export.bench.report import default_out_dir, main_log, paper_table, sweep_table, write_outputs
    from ferret_export.bench.run import BACKENDS, BenchConfig, resolve_device, run_bench

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
