"""The export pipeline: checkpoint -> ONNX -> (fp16 | INT8 Q/DQ) -> engine, one verified stage at a time.

Each stage is a plain function from a file to the file it writes, and writes nothing unless what it
produced passed its check: ``export_onnx`` (ONNX Runtime vs PyTorch), :func:`quantize_verified`
(INT8 vs fp32 labels, the agreement floor), ``tensorrt.build_engine`` (TensorRT vs ONNX Runtime).
:func:`to_onnx` composes the first two; ``tensorrt.export_and_build`` puts the engine after them, so
``ferret export onnx --int8`` and ``ferret export tensorrt --weights W --int8`` share one set of
INT8 rules. ``FORMATS`` says what each format accepts, and :func:`check_request` enforces it.

Light on purpose: the CLI imports this module to list the formats, so onnx, onnxruntime and torch
are imported by the stages that use them.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferret_runtime.errors import ConfigError

PRECISIONS = ("fp32", "fp16", "int8")
LPD_MODES = ("portable", "plugin", "external")  # portable: standard layers; plugin: ferret::lpd; external: no LPD
INT8_LPD = "portable"  # ONNX Runtime calibrates the INT8 graph, so it must run the LPD itself
CALIB_METHODS = ("percentile", "entropy", "minmax")


@dataclass(frozen=True)
class Format:
    """One ``ferret export FORMAT``: what it writes and which options it takes."""

    name: str  # the subcommand; its module is ferret_export.commands.export_NAME
    suffixes: tuple[str, ...]  # of what it writes (a directory: none)
    precisions: tuple[str, ...]  # of a model exported from a checkpoint
    lpd_modes: tuple[str, ...]
    needs_gpu: bool
    strict_suffix: bool = False  # refuse --out with another suffix (ONNX files have always been any name)


FORMATS: dict[str, Format] = {
    "onnx": Format("onnx", (".onnx",), PRECISIONS, LPD_MODES, needs_gpu=False),
    "tensorrt": Format("tensorrt", (".engine", ".plan"), PRECISIONS, LPD_MODES, needs_gpu=True, strict_suffix=True),
    "triton": Format("triton", (), (), (), needs_gpu=False),  # a model repository from an exported file
}


@dataclass(frozen=True)
class Int8Options:
    """Post-training quantisation: calibration images and the floor the result must reach."""

    calib_data: Sequence[str | Path] | None
    calib_images: int = 256  # drawn (seeded) from calib_data
    calib_method: str = "percentile"
    float_layers: int = 2  # leading Conv layers kept float32
    min_agreement: float = 0.99  # share of images whose int8 and fp32 labels must agree


def check_out(fmt: str, out: str | Path) -> None:
    """``out`` has a suffix the format writes, where the format insists on one."""
    f, out = FORMATS[fmt], Path(out)
    if f.strict_suffix and out.suffix.lower() not in f.suffixes:
        raise ConfigError(f"Received --out {out}; expected a {' or '.join(f.suffixes)} path")


def check_request(fmt: str, *, precision: str, lpd: str, int8: Int8Options | None = None,
                  fp16: bool = False) -> None:
    """The same rules for every format that exports a checkpoint; ConfigError naming the option."""
    f = FORMATS[fmt]
    if precision not in f.precisions:
        raise ConfigError(f"Received precision {precision!r}; expected one of {', '.join(f.precisions)}")
    if lpd not in f.lpd_modes:
        raise ConfigError(f"Received --lpd {lpd!r}; expected one of {', '.join(f.lpd_modes)}")
    if precision != "int8":
        return
    if fp16 or lpd != INT8_LPD:
        raise ConfigError("Received --int8 with " + ("--fp16" if fp16 else f"--lpd {lpd}") + f"; expected --lpd "
                          f"{INT8_LPD} and no --fp16 (INT8 quantises the fp32 portable graph: ONNX Runtime must run it "
                          "to calibrate)")
    if int8 is None or not int8.calib_data:
        raise ConfigError("Received --int8 without --calib-data; expected image files or folders to calibrate on "
                          "(e.g. --calib-data data/train --calib-images 256)")
    if int8.calib_method not in CALIB_METHODS:
        raise ConfigError(f"Received --calib-method {int8.calib_method!r}; expected one of {', '.join(CALIB_METHODS)}")
    if not 0.0 <= int8.min_agreement <= 1.0:
        raise ConfigError(f"Received --int8-min-agreement {int8.min_agreement}; expected 0..1")


# ------------------------------------------------------------------------------------- stages
def quantize_verified(fp32: Path, out: Path, int8: Int8Options, verify_images: list | None = None,
                      log: Callable[[str], None] = print) -> Any:
    """fp32 ONNX -> calibrated INT8 Q/DQ ONNX at ``out``, written only when int8 and fp32 labels agree
    on at least ``int8.min_agreement`` of the verification images (``verify_images``, else the
    calibration images). Returns the ``QuantResult``."""
    from ferret_export.int8.data import verify_int8
    from ferret_export.int8.quantize import quantize_int8
    from ferret_export.verify import ParityError

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".ferret-int8-", dir=out.parent) as tmp:
        q = Path(tmp) / "int8.onnx"
        res = quantize_int8(fp32, q, int8.calib_data, n_images=int8.calib_images, method=int8.calib_method,
                            float_layers=int8.float_layers, log=log)
        images = verify_images or res.images  # the calibration images, drawn and decoded once
        cmp = verify_int8(fp32, q, images, log=log)
        if cmp.agreement < int8.min_agreement:
            raise ParityError(f"{out}: not written: int8 and fp32 labels agree on {100 * cmp.agreement:.2f}% of "
                              f"{cmp.n} images; expected >= {100 * int8.min_agreement:.2f}% (try --calib-method "
                              f"percentile, more --calib-images or a larger --int8-float-layers)")
        os.replace(q, out)  # same directory: atomic, and the file keeps the permissions atomic_write gave it
    log(f"[export] wrote {out} ({out.stat().st_size / 1e6:.2f} MB int8, {res.n_images} calibration images, "
        f"{res.method})")
    return res


def to_onnx(weights: str | Path, out: str | Path, opts: Any, int8: Int8Options | None = None, *,
            verify_images: list | None = None, log: Callable[[str], None] = print, **export_options: Any) -> Path:
    """checkpoint -> ONNX verified against PyTorch (``opts``: ``GraphOptions``), then with ``int8``
    the fp32 graph (in a temporary directory beside ``out``) -> :func:`quantize_verified` -> ``out``."""
    from ferret_export.onnx.export import export_onnx

    out = Path(out)
    if int8 is None:
        export_onnx(weights, out, opts, verify_images=verify_images, log=log, **export_options)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".ferret-int8-", dir=out.parent) as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        export_onnx(weights, fp32, opts, verify_images=verify_images, log=log, **export_options)
        quantize_verified(fp32, out, int8, verify_images, log)
    return out
