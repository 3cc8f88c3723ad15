"""``ferret serve``: an HTTP detection service with dynamic batching."""

from __future__ import annotations

import argparse

from ferret_runtime.commands import HelpFormatter
import sys

from ..errors import ConfigError
from ..preprocess import parse_crop

HELP = "serve a model over HTTP (POST /v1/detect) with dynamic batching, health checks and Prometheus metrics"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help=HELP, description=HELP + ".", formatter_class=HelpFormatter,
        epilog="Endpoints: POST /v1/detect (an image as the raw body, or several as multipart/form-data file parts) "
               "-> {\"results\": [{path, logit, prob_fake, label}]}; 400 bad image, 413 body too large, 503 + "
               "Retry-After when the queue is full. GET /healthz, /readyz (model warmed up), /metrics (Prometheus). "
               "SIGTERM finishes in-flight requests, then exits. \nExample:\n  ferret serve --model ferretnet-s.onnx "
               "--port 8000, then: curl --data-binary @photo.jpg localhost:8000/v1/detect",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", "-m", metavar="M", help="model file (.onnx, .engine, or a .pth/.pt checkpoint)")
    src.add_argument("--weights", "-w", metavar="W", help="PyTorch checkpoint (same as --model W.pth)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--device", default="auto", help="auto (GPU when available), cpu, cuda or cuda:N")
    p.add_argument("--crop", default="model", metavar="256|none", help="centre crop, 'none', or the model's ('model')")
    p.add_argument("--max-batch", type=int, default=32, help="largest batch the batcher forms")
    p.add_argument("--max-delay-ms", type=float, default=5.0,
                   help="how long the first request of a batch waits for company before the batch runs")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests allowed to wait; beyond it requests get 503 at once (bounded memory)")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body accepted (else 413)")
    p.add_argument("--workers", type=int, default=4, help="image decoding threads")
    p.add_argument("--threshold", type=float, default=None, help="label 'fake' above this probability (default: the model's)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
        import prometheus_client  # noqa: F401
        import multipart  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"ferret serve needs the 'serve' extra (missing {e.name}): pip install 'ferretnet-deploy[serve]'") from None
    from ..detector import Detector
    from ..serve import ServeConfig, serve

    for name in ("max_batch", "max_queue", "workers"):
        if getattr(args, name) < 1:
            raise ConfigError(f"Received --{name.replace('_', '-')} {getattr(args, name)}; expected >= 1")
    crop = "model" if args.crop == "model" else parse_crop(args.crop)
    det = Detector.open(args.model or args.weights, device=args.device, crop=crop, threshold=args.threshold,
                        batch_size=args.max_batch, workers=args.workers)
    print(f"[serve] {args.model or args.weights} on {det.backend.name}, http://{args.host}:{args.port}/v1/detect",
          file=sys.stderr)
    serve(det, args.host, args.port, ServeConfig(args.max_batch, args.max_delay_ms, args.max_queue, args.max_body_mb),
          log_level=args.log_level)
    return 0
