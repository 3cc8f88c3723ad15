"""``ferret detect``: classify image files and folders as real or AI-generated."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from ferret_runtime.commands import HelpFormatter, add_backend_argument, add_streams_argument

from ..errors import ConfigError, FerretError
from ..preprocess import DEFAULT_MAX_PIXELS, parse_crop
from ..scan.rows import printable as _printable
from ..tiling import add_tile_arguments, tile_options
from ..video import VIDEO_SUFFIXES, is_video

HELP = "classify images (files or folders, recursively) as real or AI-generated"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "detect", help=HELP, description=HELP + ".",
        formatter_class=HelpFormatter,
        epilog="Exit status: 0 when every input was classified, 1 when any could not be read, "
               "2 on a usage or model error. \nExample:\n  ferret detect photos/ --weights "
               "ferretnet-s-median-3.pth --json",
    )
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="image files, folders (searched recursively for images) and/or video files "
                        f"({', '.join(VIDEO_SUFFIXES)}: frames are scored, then summarised)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", "-w", metavar="W",
                     help="PyTorch checkpoint (.pth/.pt): the authors' original format or ours")
    src.add_argument("--model", "-m", metavar="M", help="any model file a backend supports (by suffix)")
    p.add_argument("--crop", default="model", metavar="256|none",
                   help="centre-crop size (zero-padded when the image is smaller) or 'none' for full size; "
                        "'model' uses the model's own setting (256 for the authors' checkpoint)")
    p.add_argument("--batch-size", "-b", type=int, default=None, metavar="N",
                   help="images per forward pass (only images of equal size share a batch); default: the one "
                        "--backend auto measured for ONNX models on the CPU, else 32")
    p.add_argument("--threshold", type=float, default=None, metavar="P",
                   help="label 'fake' when prob_fake exceeds P (default: the model's, 0.5)")
    p.add_argument("--json", action="store_true",
                   help='one JSON object per line: {"path", "logit", "prob_fake", "label"} or {"path", "error"}')
    p.add_argument("--device", default="auto", help="auto (GPU when available), cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, default=4, metavar="N", help="image decoding threads")
    add_streams_argument(p)
    add_backend_argument(p)
    add_tile_arguments(p)
    p.add_argument("--max-pixels", default=str(DEFAULT_MAX_PIXELS), metavar="N|none",
                   help=f"refuse images of more than N pixels (width x height; {DEFAULT_MAX_PIXELS / 1e6:g} Mpx by "
                        "default) from their header, before decoding; 'none' leaves only Pillow's "
                        "decompression-bomb limit of 178.9 Mpx")
    p.add_argument("--lpd", default=None, metavar="FUNC",
                   help="LPD function for checkpoints that do not record it (default: from the file name "
                        "'<name>-<func>-<k>.pth', else median)")
    p.add_argument("--window", type=int, default=None, metavar="K", help="LPD window for such checkpoints")
    p.add_argument("--explain", metavar="OUT_DIR", default=None,
                   help="save one PNG panel per image: image, LPD reconstruction, residual and Grad-CAM "
                        "(PyTorch checkpoints only)")
    p.add_argument("--every", type=int, default=1, metavar="N", help="videos: score every N-th frame")
    p.add_argument("--max-frames", type=int, default=None, metavar="M", help="videos: score at most M frames each")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _table_row(r) -> str:
    if r.error is not None:
        # errors already name their input ("x.png: no such file"): print it once
        text = r.error if r.error.startswith(f"{r.path}:") else f"{r.path}: {r.error}"
        return _printable(f"{'ERROR':<6} {'':>9} {'':>9}  {text}")
    return _printable(f"{r.label:<6} {r.prob_fake:9.4f} {r.logit:9.4f}  {r.path}")


def _json_line(d: dict) -> str:
    """One strict JSON object: NaN/Infinity are not JSON, so a non-finite value is a bug, not output."""
    return json.dumps(d, allow_nan=False)


def _parse_max_pixels(value: str) -> int | None:
    """``--max-pixels``: a positive integer (``40_000_000`` works too) or 'none'."""
    if value.lower() == "none":
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n <= 0:
        raise ConfigError(f"Received --max-pixels {value!r}; expected a positive number of pixels or 'none'")
    return n


def run(args: argparse.Namespace) -> int:
    from ..detector import Detector
    from ..preprocess import find_images

    crop = "model" if args.crop == "model" else parse_crop(args.crop)
    max_pixels = _parse_max_pixels(args.max_pixels)
    # our --max-pixels is the limit that counts; Pillow's warning for 89-179 Mpx images would only add
    # noise to stderr before the refusal (Pillow's own error above 178.9 Mpx still applies)
    from PIL import Image

    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    # stdout may be a strict ASCII/latin-1 terminal: show what it cannot encode as escapes, never crash
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"Received --batch-size {args.batch_size}; expected >= 1")
    options = {k: v for k, v in (("lpd_func", args.lpd), ("window_size", args.window)) if v is not None}
    model_path = args.weights or args.model
    found = find_images(args.paths)
    videos = [p for p in found if is_video(p)]
    paths = [p for p in found if not is_video(p)]
    if not found:
        raise ConfigError(f"Received {args.paths}; expected at least one image file or a folder containing images")
    if videos and (args.every < 1 or (args.max_frames is not None and args.max_frames < 1)):
        raise ConfigError(f"Received --every {args.every} --max-frames {args.max_frames}; expected values >= 1")

    explainer = None
    with Detector.open(model_path, device=args.device, crop=crop, threshold=args.threshold,
                       batch_size=args.batch_size, workers=args.workers, max_pixels=max_pixels,
                       streams=args.streams, backend=args.backend, **tile_options(args), **options) as det:
        if det.auto_choice is not None:
            print(f"ferret detect: {det.auto_choice.describe()}", file=sys.stderr)
        if args.explain:
            make = getattr(det.backend, "explainer", None)
            if make is None:
                raise ConfigError(f"--explain needs a PyTorch checkpoint; received {model_path!r}")
            explainer = make(Path(args.explain))
        failed = 0
        if not args.json:
            print(f"{'label':<6} {'prob_fake':>9} {'logit':>9}  path")
        progress = _progress(len(paths), args.quiet)

        def emit(result, image) -> None:
            print(_json_line(result.to_dict()) if args.json else _table_row(result), flush=True)
            if explainer is not None and image is not None:
                explainer(image, result)

        for result, image in det.predict_iter(paths):
            failed += result.error is not None
            emit(result, image)
            progress.update(1)
        progress.close()
        for video in videos:
            failed += not _detect_video(det, video, args, emit)
    total = len(paths) + len(videos)
    if failed:
        print(f"ferret detect: {failed} of {total} inputs could not be read", file=sys.stderr)
    return 1 if failed else 0


def _detect_video(det, path: Path, args: argparse.Namespace, emit) -> bool:
    """Score a video's sampled frames and print its summary; False when it or any frame could not be read."""
    from ..video import VideoSummary, iter_frames

    summary = VideoSummary(str(path))
    frames = iter_frames(path, args.every, args.max_frames)
    progress = _progress(args.max_frames or 0, args.quiet)
    ok = True
    try:
        for result, image in det.predict_named((f.name(path), f.image) for f in frames):
            emit(result, image)
            if result.error is None:  # a frame without a verdict (non-finite logit) has no place in the mean
                summary.add(result.prob_fake, result.label)
            ok = ok and result.error is None
            progress.update(1)
    except FerretError as e:
        progress.close()
        print(_json_line({"path": str(path), "error": str(e)}) if args.json
              else _printable(f"{'ERROR':<6} {'':>9} {'':>9}  {e}"), flush=True)
        return False
    progress.close()
    print(_json_line(summary.to_dict()) if args.json else _printable(summary.line()), flush=True)
    return ok


def _progress(total: int, quiet: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a base dependency, but keep working if it was removed
        quiet = True
    if quiet:
        class _Null:
            def update(self, n: int) -> None: ...
            def close(self) -> None: ...
        return _Null()
    # disable=None: the bar shows only on a terminal, so piped --json output stays clean
    return tqdm(total=total, unit="img", file=sys.stderr, disable=None, leave=False)
