"""Build a small C source of this package into a shared library with the system C compiler, once.

The library lands in a cache folder (``$FERRET_CACHE/decode``, else ``$XDG_CACHE_HOME/ferret/decode``
or ``~/.cache/ferret/decode``, else one in the temporary directory: the kernels' cache convention, with a
``decode`` subfolder), named by a hash of the source, the headers, the compiler and the flags, so an edit
or another compiler builds afresh and several processes building at once all end with one whole file
(each writes its own temporary file and renames it into place).

Failures are :class:`BuildError` with a one-line reason: the callers turn them into "region path off".
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import FerretError
from ..kernels import cache_candidates, cache_dir

C_FLAGS: tuple[str, ...] = ("-O2", "-shared", "-fPIC")
COMPILE_TIMEOUT_S = 120


class BuildError(FerretError):
    """A C source could not be built (no compiler, a compile error, no writable place)."""


def find_c_compiler() -> list[str]:
    """``$CC`` (split like a shell would, so ``CC="ccache gcc"`` works), else the first of cc, gcc, clang
    on PATH, as an argument list with the program resolved to a path."""
    if os.environ.get("CC"):
        cmd = shlex.split(os.environ["CC"])
        found = shutil.which(cmd[0]) if cmd else None
        if not found:
            raise BuildError(f"no C compiler: $CC={os.environ['CC']!r} is not an executable program")
        return [found, *cmd[1:]]
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return [found]
    raise BuildError("no C compiler: none of cc, gcc, clang on PATH and $CC unset (e.g. `apt-get install gcc`)")


def mapped_libraries(prefix: str) -> list[str]:
    """Paths of the shared libraries mapped into this process whose file name starts with ``prefix``, in map
    order without repeats (Linux ``/proc/self/maps``: the very copies Pillow's C modules loaded).
    OSError when the map cannot be read."""
    found: list[str] = []
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and os.path.basename(parts[5].strip()).startswith(prefix):
                path = parts[5].strip()
                if path not in found:
                    found.append(path)
    return found


def cache_dirs() -> list[Path]:
    """Where built libraries go, in order of preference (the kernels' cache roots, folder ``decode``)."""
    return cache_candidates("decode")


def _writable_dir() -> Path:
    d = cache_dir("decode")
    return d if os.access(d, os.W_OK | os.X_OK) else Path(tempfile.mkdtemp(prefix="ferret-decode-"))


def build_key(source: Path, include: Path | None, compiler: list[str], flags: tuple[str, ...]) -> str:
    """First 16 hex digits of SHA-256 over the source, every header under ``include``, the compiler and flags."""
    h = hashlib.sha256(source.read_bytes())
    if include is not None:
        for header in sorted(include.glob("*.h")):
            h.update(b"\0" + header.name.encode() + b"\0" + header.read_bytes())
    for part in (*compiler, *flags):
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:16]


def build_shared(source: Path, include: Path | None = None, libs: tuple[str, ...] = ()) -> Path:
    """The shared library built from ``source`` (cached; compiled on the first call). BuildError if it cannot be."""
    compiler = find_c_compiler()
    flags = (*C_FLAGS, *(("-I", str(include)) if include is not None else ()))
    try:
        key = build_key(source, include, compiler, (*flags, *libs))
    except OSError as e:
        raise BuildError(f"cannot read {source}: {e.strerror or e}") from None
    name = f"{source.stem}-{key}.so"
    for d in cache_dirs():
        if (d / name).is_file():
            return d / name
    out = _writable_dir() / name
    tmp = out.with_name(f".{name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    cmd = [*compiler, *flags, "-o", str(tmp), str(source), *libs]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"{compiler[0]} could not build {source.name}: {e}") from None
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        first = next((line for line in proc.stderr.splitlines() if "error" in line), proc.stderr.strip()[:200])
        first = first or "(no error output)"
        raise BuildError(f"{compiler[0]} exited with status {proc.returncode} on {source.name}: {first}")
    try:
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"cannot store the build of {source.name} in {out.parent}: {e.strerror or e}") from None
    return out
