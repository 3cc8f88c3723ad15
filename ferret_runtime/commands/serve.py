"""``ferret serve``: an HTTP detection service with dynamic batching."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ferret_runtime.commands import HelpFormatter, add_streams_argument

from ..errors import ConfigError
from ..preprocess import DEFAULT_MAX_PIXELS, parse_crop
from ..tiling import add_tile_arguments, tile_options

HELP = "serve a model over HTTP (POST /v1/detect) with dynamic batching, health checks and Prometheus metrics"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help=HELP, description=HELP + ".", formatter_class=HelpFormatter,
        epilog="Endpoints: POST /v1/detect (an image as the raw body, or several as multipart/form-data file parts) "
               "-> {\"results\": [{path, logit, prob_fake, label}]}; 400 bad or empty image, 401 no valid token "
               "(--api-key-file), 404/405 unknown route or method, 408 body not in within --read-timeout, 413 body "
               "too large or too many parts, 431 headers too large, 503 + Retry-After when the queue, the in-flight "
               "bytes or the requests in progress are full, 500 (counted, logged) for a server fault; every error is "
               "JSON {\"error\": ...}. GET /healthz, /readyz (model warmed up): always open; /metrics (Prometheus): "
               "needs the token when keys are set, unless --metrics-public. SIGTERM finishes in-flight requests "
               "(at most --shutdown-timeout), then exits. Memory: under 2 GB for FerretNet-S with the defaults, "
               "whatever the input. \nExample:\n  ferret serve --model ferretnet-s.onnx "
               "--port 8000, then: curl --data-binary @photo.jpg localhost:8000/v1/detect",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", "-m", metavar="M", help="model file (.onnx, .engine, or a .pth/.pt checkpoint)")
    src.add_argument("--weights", "-w", metavar="W", help="PyTorch checkpoint (same as --model W.pth)")
    p.add_argument("--model-name", default=None, metavar="NAME",
                   help="the model's name in the KServe v2 routes (/v2/models/NAME/infer); default: the model "
                        "file's name without its suffix")
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
    p.add_argument("--max-json-mb", type=float, default=1.0,
                   help="largest JSON part of a v2 request (the whole body, or the header before binary data); else "
                        "413. json.loads holds the interpreter lock (about 0.25 s a MB at worst) and builds objects of "
                        "up to 20x the text; a 256x256 image is about 0.7 MB as JSON: send larger ones as binary data")
    p.add_argument("--max-inflight-mb", type=float, default=256.0,
                   help="request body bytes accepted and not yet answered, all requests together; past it 503 + "
                        "Retry-After (bounds memory whatever --max-queue x --max-body-mb)")
    p.add_argument("--max-parts", type=int, default=64, help="most multipart parts in one request (else 413)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="largest image (width x height) decoded; larger ones are refused from their header (400)")
    p.add_argument("--read-timeout", type=float, default=10.0,
                   help="seconds a connection has from accept (TLS handshake included) to send a request's headers "
                        "(else it is closed), and then its body (else 408)")
    p.add_argument("--max-connections", type=int, default=256,
                   help="requests in progress at once (headers received, not yet answered); requests past it get "
                        "503 + Retry-After. Idle connections do not count")
    p.add_argument("--max-idle-connections", type=int, default=512,
                   help="connections with no request in progress (TLS handshake, headers arriving, keep-alive); "
                        "past it the oldest is closed to make room, so idle or slow clients never lock others out")
    p.add_argument("--max-header-kb", type=float, default=16.0,
                   help="largest request line and headers (else 431)")
    p.add_argument("--keep-alive-timeout", type=float, default=5.0,
                   help="seconds an idle keep-alive connection stays open")
    p.add_argument("--shutdown-timeout", type=float, default=20.0,
                   help="seconds SIGTERM waits for in-flight requests; those still running are then answered 503")
    p.add_argument("--api-key-file", metavar="PATH", default=None,
                   help="require 'Authorization: Bearer <token>' on /v1/detect (and /metrics), tokens one per line "
                        "in PATH, # comments and blank lines skipped (else 401); /healthz and /readyz stay open "
                        "(default: no authentication)")
    p.add_argument("--metrics-public", action="store_true", help="serve /metrics without the token when keys are set")
    p.add_argument("--ssl-certfile", metavar="PEM", default=None,
                   help="serve HTTPS with this certificate (chain) (default: plain HTTP)")
    p.add_argument("--ssl-keyfile", metavar="PEM", default=None,
                   help="the certificate's private key, unencrypted (warned when other users can read it)")
    p.add_argument("--workers", type=int, default=4, help="image decoding threads")
    add_streams_argument(p)
    add_tile_arguments(p)
    p.add_argument("--threshold", type=float, default=None,
                   help="label 'fake' above this probability (default: the model's)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import multipart  # noqa: F401
        import prometheus_client  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"ferret serve needs the 'serve' extra (missing {e.name}): "
                          "pip install 'ferretnet-deploy[serve]'") from None
    from ..detector import Detector
    from ..serve import ServeConfig, ServerLimits, load_api_keys, serve
    from ..serve.http_limits import fit_fd_limit, key_file_warning, tls_context

    for name in ("max_batch", "max_queue", "workers", "max_parts", "max_pixels", "max_connections",
                 "max_idle_connections"):
        if getattr(args, name) < 1:
            raise ConfigError(f"Received --{name.replace('_', '-')} {getattr(args, name)}; expected >= 1")
    for name in ("max_body_mb", "max_inflight_mb", "max_json_mb", "read_timeout", "keep_alive_timeout",
                 "shutdown_timeout", "max_header_kb"):
        if not getattr(args, name) > 0:
            raise ConfigError(f"Received --{name.replace('_', '-')} {getattr(args, name)}; expected > 0")
    if args.max_inflight_mb < args.max_body_mb:
        raise ConfigError(f"Received --max-inflight-mb {args.max_inflight_mb:g} below --max-body-mb "
                          f"{args.max_body_mb:g}; expected at least one largest body to fit")
    if (args.ssl_certfile is None) != (args.ssl_keyfile is None):
        raise ConfigError("Received only one of --ssl-certfile and --ssl-keyfile; expected both or neither")
    keys = load_api_keys(args.api_key_file) if args.api_key_file else ()
    if args.ssl_certfile:  # checked before the model loads: a bad key is one line, not a traceback after it
        tls_context(args.ssl_certfile, args.ssl_keyfile)
        if warning := key_file_warning(args.ssl_keyfile):
            print(warning, file=sys.stderr)
    fit_fd_limit(args.max_connections + args.max_idle_connections)
    crop = "model" if args.crop == "model" else parse_crop(args.crop)
    det = Detector.open(args.model or args.weights, device=args.device, crop=crop, threshold=args.threshold,
                        batch_size=args.max_batch, workers=args.workers, max_pixels=args.max_pixels,
                        streams=args.streams, **tile_options(args))
    scheme = "https" if args.ssl_certfile else "http"
    name = args.model_name or Path(args.model or args.weights).stem
    base = f"{scheme}://{args.host}:{args.port}"
    print(f"[serve] {args.model or args.weights} on {det.backend.name}: {base}/v1/detect and "
          f"{base}/v2/models/{name}/infer{' (bearer token required)' if keys else ''}", file=sys.stderr)
    config = ServeConfig(args.max_batch, args.max_delay_ms, args.max_queue, args.max_body_mb,
                         max_inflight_mb=args.max_inflight_mb, max_parts=args.max_parts,
                         read_timeout=args.read_timeout, api_keys=keys, metrics_public=args.metrics_public,
                         model_name=name, max_json_mb=args.max_json_mb)
    limits = ServerLimits(args.max_connections, args.keep_alive_timeout, args.shutdown_timeout,
                          args.ssl_certfile, args.ssl_keyfile, max_idle_connections=args.max_idle_connections,
                          max_header_kb=args.max_header_kb)
    serve(det, args.host, args.port, config, log_level=args.log_level, limits=limits)
    return 0
