"""``ferret scan``: score a whole dataset into one Parquet file, resumably, here or on a Ray cluster.

Exit status (also in ``--help``): 0 every input has a verdict; 1 the scan is complete and some rows
are errors; 2 a usage, model or output-choice error (nothing written: bad flag, --out naming the
model, the source or a file that is not a scan's output, another scan holding the lock); 3 the
output cannot be written (read-only folder, full disk): every part committed before is kept and the
same command continues from them. Each failure is one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ferret_runtime.commands import HelpFormatter, add_streams_argument

from ..errors import ConfigError
from ..scan.fetch import FETCH_TIMEOUT_S, MAX_FETCH_BYTES

EXIT_ERROR_ROWS, EXIT_USAGE, EXIT_STORAGE = 1, 2, 3

HELP = "score a dataset (folder, list of paths or URIs, Parquet/CSV manifest) into one Parquet file, resumably"


def _gpus(text: str) -> float | None:
    if text == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0:
        raise argparse.ArgumentTypeError(f"received {text!r}; expected a number of GPUs >= 0 (fractions share one) "
                                         "or 'auto'")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "scan", help=HELP, description=HELP + ". Parts of --part-rows rows are committed as they are scored; "
        "a stopped scan run again continues where it stopped (nothing scored twice, nothing lost), then merges "
        "them into --out.", formatter_class=HelpFormatter,
        epilog="Exit status: 0 when every path has a verdict, 1 when the scan is complete and some rows are "
               "errors, 2 on a usage, model or --out error (nothing written), 3 when the output cannot be written "
               "(read-only folder, full disk; committed parts are kept: run the same command again).\n"
               "Examples:\n  ferret scan photos/ --out results.parquet -m ferretnet-s.onnx\n"
               "  ferret scan manifest.parquet --out results.parquet -m ferretnet-s.onnx --ray auto --concurrency 8")
    p.add_argument("source", metavar="SOURCE",
                   help="a folder (images, recursively), a .parquet or .csv manifest (column --column), or a text "
                        "file of paths or URIs (s3://, gs://, hdfs://, file://), one a line")
    p.add_argument("--out", "-o", required=True, metavar="OUT.parquet",
                   help="the results (path, logit, prob_fake, label, error, model_sha256, scanned_at, path_bytes); "
                        "parts wait in OUT.parquet.parts/ until the scan is complete")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", "-m", metavar="M", help="any model file a backend supports (by suffix)")
    src.add_argument("--weights", "-w", metavar="W", help="PyTorch checkpoint (.pth/.pt)")
    p.add_argument("--ray", metavar="ADDRESS", default=None,
                   help="run on Ray Data: 'auto' (the cluster 'ray start --head' started), 'local' (a new local "
                        "instance, on 127.0.0.1 only) or an address such as ray://host:10001 (default: in this "
                        "process, no Ray)")
    p.add_argument("--concurrency", type=int, default=2, metavar="N", help="Ray actors, each with its own model")
    p.add_argument("--num-gpus", type=_gpus, default="auto", metavar="G|auto",
                   help="GPUs per Ray actor; auto: 1 where the cluster has GPUs and --device is not cpu")
    p.add_argument("--num-cpus", type=float, default=1.0, metavar="C", help="CPUs reserved per Ray actor")
    p.add_argument("--column", default="path", help="the manifest's path column")
    p.add_argument("--part-rows", type=int, default=1024, metavar="N",
                   help="rows per committed part: the most a crash can cost")
    p.add_argument("--batch-size", "-b", type=int, default=32, metavar="N", help="images per forward pass")
    p.add_argument("--fetch-timeout", type=float, default=FETCH_TIMEOUT_S, metavar="S",
                   help="seconds to read one URI (s3://, gs://, ...); past it, that input is an error row")
    p.add_argument("--max-fetch-mb", type=float, default=MAX_FETCH_BYTES / 2**20, metavar="MB",
                   help="URI bytes read ahead of decoding, all fetches together (16 at a time, per actor)")
    p.add_argument("--device", default="auto", help="auto (GPU when available), cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, default=4, metavar="N", help="image decoding threads (per actor)")
    add_streams_argument(p)
    p.add_argument("--threshold", type=float, default=None, metavar="P",
                   help="label 'fake' when prob_fake exceeds P (default: the model's)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise ConfigError("ferret scan writes Parquet with pyarrow: pip install 'ferretnet-deploy[scan]'") from None
    from ..scan import ScanStorageError, run_scan

    if args.workers < 1:
        raise ConfigError(f"Received --workers {args.workers}; expected >= 1")
    if not args.fetch_timeout > 0 or not args.max_fetch_mb > 0:
        raise ConfigError(f"Received --fetch-timeout {args.fetch_timeout} --max-fetch-mb {args.max_fetch_mb}; "
                          "expected each > 0")
    options = {"device": args.device, "workers": args.workers, "threshold": args.threshold}
    if args.streams is not None:
        options["streams"] = args.streams
    out = Path(args.out)
    try:
        summary = run_scan(args.source, out, args.model or args.weights, column=args.column, ray_address=args.ray,
                           part_rows=args.part_rows, batch_size=args.batch_size, concurrency=args.concurrency,
                           num_gpus=args.num_gpus, num_cpus=args.num_cpus, quiet=args.quiet,
                           fetch_timeout=args.fetch_timeout, max_fetch_bytes=max(1, int(args.max_fetch_mb * 2**20)),
                           **options)
    except ScanStorageError as e:  # the CLI answers 2 for other FerretErrors: this one has its own code
        print(f"ferret scan: error: {e}", file=sys.stderr)
        return EXIT_STORAGE
    except OSError as e:  # a read or write the checks above did not foresee: still one line, still exit 3
        print(f"ferret scan: error: {e}; parts already committed are kept (run the same command again)",
              file=sys.stderr)
        return EXIT_STORAGE
    print(summary.text(out), file=sys.stderr)
    return EXIT_ERROR_ROWS if summary.errors else 0
