"""JPEG decoding on the GPU (nvJPEG through nvImageCodec): batched, only the centre crop, kept on the device.

``GpuDecoder(crop=256).decode(sources)`` decodes a batch in one ``nvimgcodec.Decoder.decode`` call: the
A100/H100 hardware JPEG engine where the GPU has one (``backend="hw"``), nvJPEG's CUDA decoders
otherwise (``"cuda"``: Huffman on the GPU, or on the CPU for what needs it, such as progressive JPEGs);
``"auto"`` lists all three, hardware first, and nvImageCodec falls back per image.
Each JPEG is cut to the crop's region of interest (``CodeStream.get_sub_code_stream(region=...)``)
before decoding, so a 12 Mpx photo decodes about 256x256 pixels. ``assemble`` then writes the crops
into one uint8 NHWC device batch (zero padding exactly as ``center_crop``), which ``launch.preprocess_lpd``
reads without a host round trip. ``backend="cpu"`` is nvImageCodec's libjpeg-turbo on the host, for
tests and as a reference. A source that is not a 3-channel JPEG is decoded by ``load_prepared`` (Pillow).

Every image fails alone: a bad JPEG is that image's ``ImageError`` in the returned list.

Parity: another IDCT and chroma upsampling change pixels, so ``decision_parity`` compares the CPU and
GPU decodes' logits (verdict flips at the threshold, max and p99 |delta logit|) and pixels. The GPU
decode is the default only where it holds (``default_decode``); otherwise an option, ``DECODE_HELP``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, FerretError, ImageError
from ..preprocess import DEFAULT_MAX_PIXELS, ImageInput, Preprocess, check_max_pixels
from . import load_prepared

PIN = "nvidia-nvimgcodec-cu13[nvjpeg]>=0.9,<0.10"  # the gpu-decode extra
MISSING = "GPU decoding needs nvImageCodec (nvidia.nvimgcodec): pip install 'ferretnet-deploy[gpu-decode]'"
BACKENDS: tuple[str, ...] = ("auto", "hw", "cuda", "cpu")
LOGIT_BOUND = 0.05  # |delta logit| CPU vs GPU decode allowed for the GPU decode to be the default
DECODE_HELP = ("where images are decoded: 'cpu' (Pillow, the reference pixels) or 'gpu' (nvJPEG: the A100/H100 "
               "JPEG engine, only the crop decoded, needs nvImageCodec and a GPU). The GPU's IDCT changes pixels "
               "by a few levels, so logits move: gpu-check's decode section reports the verdict flips and the "
               f"|delta logit| against the CPU; the default is 'gpu' only where there are no flips and "
               f"|delta logit| <= {LOGIT_BOUND}")


def nvimgcodec() -> Any:
    """The nvidia.nvimgcodec module, or one line naming the extra that installs it."""
    try:
        from nvidia import nvimgcodec as nv
    except ImportError:
        raise ConfigError(MISSING) from None
    return nv


# ------------------------------------------------------------------------------- the crop's window
@dataclass(frozen=True)
class Window:
    """Where ``center_crop(img, size)`` takes its pixels: rows ``top:top+height`` and columns
    ``left:left+width`` of the image land at ``(dst_top, dst_left)`` of the size x size crop; the rest is 0."""

    top: int
    left: int
    height: int
    width: int
    dst_top: int
    dst_left: int
    size: int


def _axis(n: int, size: int) -> tuple[int, int, int]:
    pad = max(size - n, 0)
    start = int(round((n + pad - size) / 2.0)) - pad // 2  # center_crop: pad (half, floor) then round-half-even
    src = max(start, 0)
    return src, min(start + size, n) - src, src - start


def crop_window(height: int, width: int, size: int) -> Window:
    """The window of ``preprocess.center_crop`` (torchvision's rounding and zero padding) for an image."""
    if min(height, width, size) < 1:
        raise ConfigError(f"Received an image of {width}x{height} and crop {size}; expected positive sizes")
    top, h, dst_top = _axis(height, size)
    left, w, dst_left = _axis(width, size)
    return Window(top, left, h, w, dst_top, dst_left, size)


def place(window: Window, pixels: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The size x size x 3 crop from the window's pixels (height x width x 3), zero elsewhere."""
    out = np.zeros((window.size, window.size, 3), np.uint8) if out is None else out
    out[...] = 0
    out[window.dst_top:window.dst_top + window.height, window.dst_left:window.dst_left + window.width] = pixels
    return out


# ---------------------------------------------------------------------------------------- decoding
@dataclass
class Decoded:
    """One decoded image: an nvImageCodec Image (device, or host for backend 'cpu') whose pixels at
    ``(origin_y, origin_x)`` start the window, or a host crop already placed (``host``, a non-JPEG)."""

    name: str
    window: Window | None
    image: Any = None
    origin: tuple[int, int] = (0, 0)
    host: np.ndarray | None = None

    def interface(self) -> dict[str, Any]:
        """The image's CUDA array interface (device) or array interface (host)."""
        img = self.image
        return getattr(img, "__cuda_array_interface__", None) or img.__array_interface__

    def window_pixels(self) -> np.ndarray:
        """The window's pixels on the host (a copy through ``Image.cpu()`` for a device image)."""
        if self.host is not None:
            return self.host
        arr = np.asarray(self.image.cpu())
        (oy, ox), w = self.origin, self.window
        return arr[oy:oy + w.height, ox:ox + w.width] if w else arr


def _check(crop: int | None, backend: str, device: int, threads: int) -> None:
    if crop is not None and not (isinstance(crop, (int, np.integer)) and not isinstance(crop, bool) and crop > 0):
        raise ConfigError(f"Received crop {crop!r}; expected a positive integer or None (full size)")
    if backend not in BACKENDS:
        raise ConfigError(f"Received decode backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    for what, v, lo in (("device", device, 0), ("threads", threads, 0)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
            raise ConfigError(f"Received {what} {v!r}; expected an integer >= {lo}")


def _label(source: Any, i: int, names: list[str] | None) -> str:
    if names is not None:
        return names[i]
    return str(source) if isinstance(source, (str, os.PathLike)) else f"{type(source).__name__} #{i}"


class GpuDecoder:
    """Batched nvJPEG decoding of the centre crop; ``decode`` gives one ``Decoded`` or ``ImageError`` per source.

    ``region=False`` decodes the whole image and keeps the window's offset (the comparison the bench
    makes); ``fancy_upsampling`` (libjpeg's default, so Pillow's) interpolates 4:2:0 chroma.
    """

    def __init__(self, crop: int | None = 256, *, backend: str = "auto", device: int = 0, region: bool = True,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, threads: int = 0, fancy_upsampling: bool = True):
        _check(crop, backend, device, threads)
        self.crop, self.backend, self.device, self.region = crop, backend, int(device), bool(region)
        self.max_pixels = check_max_pixels(max_pixels)
        self.pre = Preprocess(crop=crop)
        nv = self.nv = nvimgcodec()
        kinds = {"auto": ("HW_GPU_ONLY", "GPU_ONLY", "HYBRID_CPU_GPU"), "hw": ("HW_GPU_ONLY",),
                 "cuda": ("GPU_ONLY", "HYBRID_CPU_GPU"), "cpu": ("CPU_ONLY",)}[backend]
        options = ":fancy_upsampling=1" if fancy_upsampling else ":fancy_upsampling=0"
        device_id = nv.NVIMGCODEC_DEVICE_CPU_ONLY if backend == "cpu" else self.device
        try:
            self._decoder = nv.Decoder(device_id=device_id, max_num_cpu_threads=int(threads),
                                       backends=[nv.Backend(getattr(nv.BackendKind, k)) for k in kinds],
                                       options=options)
        except Exception as e:  # no GPU, no nvJPEG, no hardware engine for 'hw'
            raise ConfigError(f"Received no usable nvImageCodec decoder for backend {backend!r} "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        # pixels as stored (no EXIF rotation), RGB: what preprocess.load_image gives
        self._params = nv.DecodeParams(apply_exif_orientation=False, color_spec=nv.ColorSpec.SRGB)

    def _stream(self, source: Any, label: str) -> tuple[Any, Window | None, Any] | Decoded:
        """(code stream to decode, window, its parent stream), or a Decoded done on the CPU (not a 3-channel
        JPEG). The parent is kept until the decode returns: a region's sub-stream reads from it."""
        if isinstance(source, (str, os.PathLike)):
            try:
                data = Path(source).read_bytes()
            except OSError as e:
                raise ImageError(f"{label}: cannot read file ({e.strerror or e})") from None
        elif isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
        else:  # arrays and PIL images are decoded already
            return self._on_cpu(source, label)
        try:
            cs = self.nv.CodeStream(data)
            codec, h, w, channels = cs.codec_name, cs.height, cs.width, cs.num_channels
        except Exception:  # nvImageCodec raises while parsing: let Pillow name the problem
            return self._on_cpu(data, label)
        if codec != "jpeg" or channels != 3:
            return self._on_cpu(data, label)
        if self.max_pixels is not None and w * h > self.max_pixels:
            raise ImageError(f"{label}: received an image of {w}x{h} = {w * h / 1e6:.1f} Mpx; "
                             f"expected at most {self.max_pixels / 1e6:.1f} Mpx (--max-pixels)")
        if self.crop is None:
            return cs, None, cs
        win = crop_window(h, w, self.crop)
        if self.region and (win.height, win.width) != (h, w):
            region = self.nv.Region(win.top, win.left, win.top + win.height, win.left + win.width)
            return cs.get_sub_code_stream(region=region), win, cs
        return cs, win, cs

    def _on_cpu(self, source: ImageInput, label: str) -> Decoded:
        crop = load_prepared(source, self.pre, label, max_pixels=self.max_pixels)
        win = crop_window(self.crop, self.crop, self.crop) if self.crop else None
        return Decoded(label, win, host=crop)

    def decode(self, sources: list[Any], names: list[str] | None = None, stream: int = 0) -> list[Decoded | ImageError]:
        """Decode a batch on ``stream`` (a CUstream as an int; the pixels are ready in that stream's order).

        Files, bytes, arrays or PIL images; a result per source, in order, an ``ImageError`` for each
        that cannot be decoded. Keep the results alive until the work queued after them has run.
        """
        if names is not None and len(names) != len(sources):
            raise ConfigError(f"Received {len(names)} names for {len(sources)} sources; expected one per source")
        out: list[Decoded | ImageError | None] = [None] * len(sources)
        todo: list[tuple[int, Any, Window | None, Any]] = []
        for i, source in enumerate(sources):
            label = _label(source, i, names)
            try:
                got = self._stream(source, label)
            except FerretError as e:
                out[i] = e if isinstance(e, ImageError) else ImageError(str(e))
                continue
            except Exception as e:  # whatever one input does (MemoryError included), the others go on
                out[i] = ImageError(f"{label}: cannot decode image ({type(e).__name__}: {e})")
                continue
            if isinstance(got, Decoded):
                out[i] = got
            else:
                todo.append((i, *got))
        images = self._run([cs for _, cs, _, _ in todo], stream) if todo else []
        for (i, _, win, _), img in zip(todo, images):
            label = _label(sources[i], i, names)
            if img is None:
                out[i] = ImageError(f"{label}: cannot decode image (nvImageCodec could not decode this JPEG)")
                continue
            origin = (0, 0) if win is None or self.region else (win.top, win.left)
            out[i] = Decoded(label, win, img, origin)
        return out  # type: ignore[return-value]

    def _run(self, streams: list[Any], stream: int) -> list[Any]:
        """One batched decode; if the batch call itself raises, each image alone, so only the bad one fails."""
        try:
            return list(self._decoder.decode(streams, params=self._params, cuda_stream=int(stream)))
        except Exception:
            one = []
            for cs in streams:
                try:
                    one.append(self._decoder.decode(cs, params=self._params, cuda_stream=int(stream)))
                except Exception:
                    one.append(None)
            return one


# ------------------------------------------------------------------------------- the uint8 batch
def assemble_host(results: list[Decoded | ImageError], size: int) -> np.ndarray:
    """The (N, size, size, 3) uint8 batch on the host: each window's pixels placed, zero padding (and
    zeros in an ImageError's place)."""
    batch = np.zeros((len(results), size, size, 3), np.uint8)
    for i, r in enumerate(results):
        if not isinstance(r, Decoded):
            continue
        if r.host is not None:
            batch[i] = r.host
        else:
            place(r.window or crop_window(size, size, size), r.window_pixels(), batch[i])
    return batch


def assemble(results: list[Decoded | ImageError], size: int, out_ptr: int, stream: Any) -> None:
    """Enqueue the (N, size, size, 3) uint8 batch at device pointer ``out_ptr`` on ``stream`` (a
    ``cuda.Stream``): zeroed, then one 2-D copy per window from the decoder's pitched image (a host
    crop, from a non-JPEG, is copied whole; an ImageError's place stays zero). No host round trip
    for the JPEGs."""
    from ..cuda import bindings, call

    decoded = [r for r in results if isinstance(r, Decoded)]
    if any(r.window is None or r.window.size != size for r in decoded if r.host is None):
        raise ConfigError(f"Received decodes without a {size}x{size} crop window; expected GpuDecoder(crop={size})")
    drv, plane = bindings("driver"), size * size * 3
    with stream.context.current():
        call("cuMemsetD8Async", drv.cuMemsetD8Async, out_ptr, 0, plane * len(results), stream.handle)
        for i, r in enumerate(results):
            dst = out_ptr + i * plane
            if not isinstance(r, Decoded):
                continue
            if r.host is not None:
                host = np.ascontiguousarray(r.host)
                call("cuMemcpyHtoDAsync", drv.cuMemcpyHtoDAsync, dst, host.ctypes.data, plane, stream.handle)
                stream.synchronize()  # pageable memory: the copy must finish before `host` may be freed
                continue
            cai, win = r.interface(), r.window
            ptr, shape = int(cai["data"][0]), cai["shape"]
            pitch = int(cai["strides"][0]) if cai.get("strides") else int(shape[1]) * 3
            (oy, ox) = r.origin
            cp = drv.CUDA_MEMCPY2D()
            cp.srcMemoryType = cp.dstMemoryType = drv.CUmemorytype.CU_MEMORYTYPE_DEVICE
            cp.srcDevice, cp.srcPitch = ptr + oy * pitch + ox * 3, pitch
            cp.dstDevice, cp.dstPitch = dst + (win.dst_top * size + win.dst_left) * 3, size * 3
            cp.WidthInBytes, cp.Height = win.width * 3, win.height
            call("cuMemcpy2DAsync", drv.cuMemcpy2DAsync, cp, stream.handle)


# ---------------------------------------------------------------------------------------- parity
@dataclass(frozen=True)
class Parity:
    """CPU decode vs GPU decode on the same images, the same preprocessing and the same model."""

    n: int
    flips: tuple[int, ...]  # indices whose verdict differs at the threshold (a non-finite logit counts)
    max_logit: float  # max |delta logit|
    p99_logit: float  # nearest-rank 99th percentile of |delta logit|
    max_pixel: int | None  # max |delta pixel| over the crops, when given
    threshold: float  # the probability threshold the verdicts were taken at
    bound: float

    @property
    def ok(self) -> bool:
        return not self.flips and self.max_logit <= self.bound

    def summary(self) -> str:
        px = "" if self.max_pixel is None else f", max |d pixel| {self.max_pixel}"
        return (f"{len(self.flips)} flips of {self.n}, max |d logit| {self.max_logit:.3g}, "
                f"p99 {self.p99_logit:.3g}{px} (bound {self.bound:g})")


def logit_threshold(threshold: float) -> float:
    """The logit at which sigmoid crosses the probability ``threshold`` (+-inf at 1 and 0)."""
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"Received threshold {threshold!r}; expected a probability in [0, 1]")
    if threshold in (0.0, 1.0):
        return math.inf if threshold == 1.0 else -math.inf
    return math.log(threshold / (1.0 - threshold))


def decision_parity(cpu_logits: Any, gpu_logits: Any, threshold: float = 0.5, cpu_pixels: Any = None,
                    gpu_pixels: Any = None, bound: float = LOGIT_BOUND) -> Parity:
    """Compare two decodes' logits: verdict 'fake' when sigmoid(logit) > threshold, as the Detector.

    p99 is the nearest rank: the ceil(0.99 n)-th smallest |delta|. A NaN or inf logit on either side
    counts as a flip and makes |delta| inf. Pixels (uint8 crops of equal shape) give max |delta pixel|.
    """
    a = np.asarray(cpu_logits, np.float64).reshape(-1)
    b = np.asarray(gpu_logits, np.float64).reshape(-1)
    if a.shape != b.shape or a.size == 0:
        raise ConfigError(f"Received {a.size} CPU and {b.size} GPU logits; expected the same number, at least one")
    if not (isinstance(bound, (int, float)) and bound >= 0):
        raise ConfigError(f"Received bound {bound!r}; expected a number >= 0")
    t = logit_threshold(threshold)
    finite = np.isfinite(a) & np.isfinite(b)
    flips = tuple(int(i) for i in np.flatnonzero(~finite | ((a > t) != (b > t))))
    delta = np.full(a.shape, np.inf)
    delta[finite] = np.abs(a[finite] - b[finite])
    p99 = float(np.sort(delta)[math.ceil(0.99 * delta.size) - 1])
    max_pixel = None
    if cpu_pixels is not None or gpu_pixels is not None:
        pa, pb = np.asarray(cpu_pixels), np.asarray(gpu_pixels)
        if pa.shape != pb.shape or pa.dtype != np.uint8 or pb.dtype != np.uint8:
            raise ConfigError(f"Received pixels {pa.dtype} {pa.shape} and {pb.dtype} {pb.shape}; "
                              "expected uint8 crops of one shape")
        max_pixel = int(np.abs(pa.astype(np.int16) - pb.astype(np.int16)).max()) if pa.size else 0
    return Parity(int(a.size), flips, float(delta.max()), p99, max_pixel, float(threshold), float(bound))


def default_decode(parity: Parity | None) -> str:
    """'gpu' only where parity was measured and holds (no flips, |delta logit| within the bound), else 'cpu'."""
    return "gpu" if parity is not None and parity.ok else "cpu"
