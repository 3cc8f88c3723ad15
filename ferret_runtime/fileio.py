"""File helpers shared by every package."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, write: Any) -> Path:
    """Call ``write(file_object)`` on a temp file beside ``path``, fsync, then rename over ``path``.

    A crash at any point leaves either the old file or the new one, never a torn file. The file
    gets the permissions a plain ``open(path, "w")`` would give (0o666 less the umask), not
    mkstemp's owner-only 0o600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def _read_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; restored at once (at import, before threads)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def sha256(path: str | os.PathLike) -> str:
    """Hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
