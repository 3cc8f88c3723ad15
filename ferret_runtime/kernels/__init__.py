"""The fused LPD kernels: one CUDA source (``lpd.cu``) built three ways.

- ``launch``: NVRTC compiles it for the current GPU, the CUDA driver loads and launches it
  (cuda-python; torch-free). ``launch.launch_config`` is the one place launch tuples come from.
- ``host``: g++ compiles the same file for the CPU (``-DFERRET_HOST_BUILD``) into C functions
  that run the kernels' per-pixel and per-block code, so CPU tests check the kernels' math.
- nvcc compiles it in the tests, to check register use and spills.

Nothing here imports torch or cuda-python at import time.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..errors import ConfigError
from ..lpd_spec import LPD_SPECS

SOURCE_PATH: Path = Path(__file__).with_name("lpd.cu")

# lpd.cu's enum: the position of each variant in LPD_SPECS (a test parses the enum and compares).
VARIANT_IDS: dict[str, int] = {name: i for i, name in enumerate(LPD_SPECS)}


def read_source() -> str:
    """The text of lpd.cu (shipped as package data)."""
    return SOURCE_PATH.read_text(encoding="utf-8")


def source_hash(*extra: str) -> str:
    """SHA-256 of lpd.cu and any build settings, the key of every cached build (first 16 hex digits)."""
    h = hashlib.sha256(SOURCE_PATH.read_bytes())
    for e in extra:
        h.update(b"\0" + e.encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    """Where builds are cached: ``$FERRET_CACHE/kernels``, else ``~/.cache/ferret/kernels``."""
    root = os.environ.get("FERRET_CACHE") or Path.home() / ".cache" / "ferret"
    return Path(root) / "kernels"


def variant_id(func: str) -> int:
    """lpd.cu's number for an LPD variant; ``origin`` has no reconstruction and is refused."""
    if func not in VARIANT_IDS:
        raise ConfigError(f"Received LPD function {func!r}; expected one of {', '.join(VARIANT_IDS)} "
                          "(the kernels reconstruct; 'origin' has nothing to reconstruct)")
    return VARIANT_IDS[func]


def write_atomic(path: Path, data: bytes) -> None:
    """Write a cache file so that a concurrent reader sees either nothing or all of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
