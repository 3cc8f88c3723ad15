"""File helpers shared by every package."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

# atomic_write's temporary files are '.NAME.<random>.tmp' beside NAME (mkstemp's random part is
# lowercase letters, digits and '_'); stale_temps recognises exactly this naming and nothing else.
_TEMP_SUFFIX = ".tmp"


def atomic_write(path: str | os.PathLike, write: bytes | Callable[[Any], Any]) -> Path:
    """Write ``write`` (bytes, or a function called with the file object) to a temp file beside
    ``path``, fsync, then rename over ``path``.

    A crash at any point leaves either the old file or the new one, never a torn file. The file
    gets the permissions a plain ``open(path, "w")`` would give (0o666 less the umask), not
    mkstemp's owner-only 0o600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(write, (bytes, bytearray, memoryview)):
                f.write(write)
            else:
                write(f)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy ``src`` to ``dst`` with :func:`atomic_write` (1 MiB blocks): ``dst`` is whole or absent."""
    with open(src, "rb") as fi:
        return atomic_write(dst, lambda fo: shutil.copyfileobj(fi, fo, 1 << 20))


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (a rename into it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stale_temps(directory: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """The temporary files atomic_write left in ``directory`` for the files ``names`` (a process killed
    mid-write cannot remove its own): regular files named '.NAME.<random>.tmp', sorted."""
    directory = Path(directory)
    pattern = re.compile(rf"\.(?:{'|'.join(map(re.escape, names))})\.[a-z0-9_]+{re.escape(_TEMP_SUFFIX)}")
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        # lstat: a symlink or folder that happens to match is not one of ours, and is left alone
        if pattern.fullmatch(p.name) and stat.S_ISREG(p.lstat().st_mode):
            found.append(p)
    return sorted(found)


def remove_stale_temps(directory: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Delete :func:`stale_temps`; only call it where no writer of those files is running."""
    found = stale_temps(directory, names)
    for p in found:
        p.unlink(missing_ok=True)
    return found


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
