"""The fused LPD kernels: one CUDA source (``lpd.cu``) built three ways.

- ``launch``: NVRTC compiles it for the current GPU, the CUDA driver loads and launches it
  (cuda-python; torch-free). ``launch.launch_config`` is the one place launch tuples come from.
- ``host``: g++ compiles the same file for the CPU (``-DFERRET_HOST_BUILD``) into C functions
  that run the kernels' per-pixel and per-block code, so CPU tests check the kernels' math.
- nvcc and NVRTC compile it in the tests for every architecture NVRTC lists (sm_75 and newer under
  CUDA 13; a V100, sm_70, is refused in one line by ``nvrtc.check_arch``), to check register use and
  spills; the float16 kernels' instructions have host implementations, so their lanes are tested too.

Nothing here imports torch or cuda-python at import time.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
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


def cache_candidates(kind: str = "kernels") -> list[Path]:
    """Cache folders in order of preference: ``$FERRET_CACHE/<kind>``, ``$XDG_CACHE_HOME/ferret/<kind>``
    (XDG's default ``~/.cache``), then one in the temporary directory (per user). ``kind``: ``kernels``,
    ``decode`` (the region decoders' C shims), ``backends`` (what ``--backend auto`` measured)."""
    roots: list[Path] = []
    if os.environ.get("FERRET_CACHE"):
        roots.append(Path(os.environ["FERRET_CACHE"]))
    xdg = os.environ.get("XDG_CACHE_HOME")
    try:
        roots.append(Path(xdg) / "ferret" if xdg else Path.home() / ".cache" / "ferret")
    except RuntimeError:  # no home directory to expand
        pass
    roots.append(Path(tempfile.gettempdir()) / f"ferret-{_user()}")
    return [r / kind for r in roots]


def _user() -> str:
    try:
        return str(os.getuid())
    except AttributeError:  # not POSIX
        return os.environ.get("USERNAME", "user")


def _writable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{os.getpid()}-{threading.get_ident()}"  # threads of one process probe at once
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError:
        return False


def cache_dir(kind: str = "kernels") -> Path:
    """The first writable folder of :func:`cache_candidates` (a read-only HOME falls through to the
    next); the last one even if unwritable, since :func:`write_atomic` never fails on a cache."""
    candidates = cache_candidates(kind)
    return next((c for c in candidates if _writable(c)), candidates[-1])


def variant_id(func: str) -> int:
    """lpd.cu's number for an LPD variant; ``origin`` has no reconstruction and is refused."""
    if func not in VARIANT_IDS:
        raise ConfigError(f"Received LPD function {func!r}; expected one of {', '.join(VARIANT_IDS)} "
                          "(the kernels reconstruct; 'origin' has nothing to reconstruct)")
    return VARIANT_IDS[func]


def write_atomic(path: Path, data: bytes) -> bool:
    """Write a cache file so that a concurrent reader sees either nothing or all of it; False (and
    nothing written) when it cannot be written: a cache is never a reason to fail."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return True
    except OSError:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        return False
