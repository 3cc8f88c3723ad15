"""``OUT.parts/``: the parts a scan commits, trusting only what this scan wrote.

A part is a Parquet file of scored rows, committed with ``fileio.atomic_write`` (whole or absent),
then recorded with its SHA-256 in ``manifest.json`` (also atomic). A scan that starts again reads
the manifest and accepts a part only if its bytes still hash to the recorded value: a file dropped
into the folder (a "part" claiming any verdict under the model's public SHA-256) is removed unread,
a truncated or corrupted part is removed and its rows scored again, each with a log line. A crash
between a part and its manifest entry costs that one part (scored again). The folder must be a real
folder owned by this user and writable by no one else, created 0700; the lock is opened without
following a link or truncating anything (``O_NOFOLLOW``, no ``O_TRUNC``), then ``flock``-ed.

Trust boundary: whoever can write ``OUT.parts/`` as this user can also rewrite the manifest; the
checks stop stray, stale, torn and planted-by-others files, not the user's own account. ``OUT``
itself (an earlier complete scan) is read as the user's own output: it must be ferret scan's
Parquet, or the scan refuses to touch it.

Failures to write (read-only folder, full disk) raise :class:`ScanStorageError` after keeping
every part already committed: the same command run again continues from them.
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import ConfigError, FerretError
from ..fileio import atomic_write
from .rows import conform, raw, schema

PART_PREFIX, PART_SUFFIX = "part-", ".parquet"
MANIFEST, LOCK = "manifest.json", ".lock"
FORMAT = "ferret-scan-parts/1"


class ScanStorageError(FerretError):
    """OUT or its parts folder cannot be written (read-only, full, not a folder); nothing committed is lost."""


def _digest(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _parse(data: bytes, source: str) -> Any:
    """A part's (or OUT's) bytes -> a table in the current schema; ``ValueError`` if it is not one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{source}: not a readable Parquet file ({e})") from None
    return conform(table, source)


class PartStore:
    """``OUT.parts/``: the lock one scan holds, the manifest of committed parts, the final merge."""

    def __init__(self, out: str | os.PathLike, model_sha256: str, log: Callable[[str], None] = lambda s: None):
        self.out = Path(out)
        self.dir = self.out.with_name(self.out.name + ".parts")
        self.model_sha256, self.log = model_sha256, log
        self._check_out()
        self._fd = self._lock()
        try:
            self.manifest = self._load_manifest()
            self._verify()
        except BaseException:
            self.close()
            raise
        self.next = 1 + max((int(n[len(PART_PREFIX):-len(PART_SUFFIX)]) for n in self.manifest), default=0)

    # ------------------------------------------------------------------------------------ opening
    def _check_out(self) -> None:
        """OUT is absent or an earlier scan's output: never a folder, a model or someone's data."""
        if self.out.is_dir():
            raise ConfigError(f"Received --out {self.out}, a folder; expected a .parquet file to write")
        if self.out.exists():
            import pyarrow.parquet as pq

            try:
                conform(pq.read_schema(self.out).empty_table(), str(self.out))
            except Exception as e:  # noqa: BLE001 - any reason it is not our output
                raise ConfigError(f"Received --out {self.out}, which is not ferret scan's output ({e}); expected a "
                                  "new file or an earlier scan's result (nothing was written)") from None

    def _lock(self) -> int:
        try:
            if not os.path.lexists(self.dir):
                if not os.path.lexists(self.out.parent):
                    self.out.parent.mkdir(parents=True)
                os.mkdir(self.dir, 0o700)
        except OSError as e:
            raise ScanStorageError(f"{self.dir}: cannot create the parts folder ({e.strerror}); expected a "
                                   "writable folder for --out") from None
        st = os.lstat(self.dir)
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"{self.dir}: received a {'symbolic link' if stat.S_ISLNK(st.st_mode) else 'file'}; "
                              "expected the scan's own parts folder (remove it, or use another --out)")
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise ConfigError(f"{self.dir}: received a folder owned by uid {st.st_uid} with mode "
                              f"{stat.S_IMODE(st.st_mode):o}; expected one of this user's (uid {os.geteuid()}), "
                              "writable by no one else")
        try:
            fd = os.open(self.dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise ConfigError(f"{self.dir / LOCK}: received a symbolic link; expected the scan's lock file "
                                  "(remove the link)") from None
            raise ScanStorageError(f"{self.dir / LOCK}: cannot open the lock ({e.strerror})") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ConfigError(f"{self.dir / LOCK}: received something other than a regular file; expected the "
                              "scan's lock file (remove it)")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"{self.dir}: received a scan already writing there; expected one scan per --out "
                              "(wait for it, or use another --out)") from None
        return fd

    def _load_manifest(self) -> dict[str, dict]:
        path = self.dir / MANIFEST
        if not path.exists():
            return {}
        try:
            doc = json.loads(path.read_bytes())
            parts = doc["parts"] if doc.get("format") == FORMAT else None
            if not isinstance(parts, dict) or not all(isinstance(v, dict) and isinstance(v.get("sha256"), str)
                                                      for v in parts.values()):
                raise ValueError(f"format {doc.get('format')!r}")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            self.log(f"[scan] {path}: unreadable ({e}); every part in {self.dir} is scored again")
            return {}
        if doc.get("model_sha256") != self.model_sha256:
            raise ConfigError(f"{path}: received parts scored by model sha256 {doc.get('model_sha256')}; expected "
                              f"{self.model_sha256} (this model): use another --out, or remove {self.dir}")
        return parts

    def _verify(self) -> None:
        """Keep the parts the manifest lists whose bytes still match; remove every other part."""
        changed = False
        for stale in self.dir.glob(f".{PART_PREFIX}*.tmp"):  # what a kill left mid-write: never committed
            stale.unlink(missing_ok=True)
        for path in self._files():
            if path.name not in self.manifest:
                self.log(f"[scan] {path}: not in the manifest (killed before it was recorded, or not written by "
                         "this scan); removed unread, its rows (if any) are scored again")
                path.unlink()
        for name in sorted(self.manifest):
            problem = self._check(self.dir / name, self.manifest[name]["sha256"])
            if problem:
                self.log(f"[scan] {self.dir / name}: {problem}; its rows are scored again")
                (self.dir / name).unlink(missing_ok=True)
                del self.manifest[name]
                changed = True
        if changed:
            self._write_manifest()

    def _check(self, path: Path, want: str) -> str | None:
        try:
            data = path.read_bytes()
        except OSError as e:
            return f"cannot be read ({e.strerror})"
        if _digest(data) != want:
            return f"{len(data)} bytes whose SHA-256 differs from the manifest's (truncated or corrupted)"
        try:
            _parse(data, str(path))
        except ValueError as e:
            return str(e)
        return None

    def _files(self) -> list[Path]:
        return sorted(p for p in self.dir.glob(f"{PART_PREFIX}*{PART_SUFFIX}")
                      if p.name[len(PART_PREFIX):-len(PART_SUFFIX)].isdigit())

    # ------------------------------------------------------------------------------------ reading
    def parts(self) -> list[Path]:
        """The committed parts this scan trusts, oldest first."""
        return [self.dir / n for n in sorted(self.manifest)]

    def tables(self) -> Iterator[Any]:
        """The earlier output, then every trusted part, each checked against its recorded SHA-256."""
        if self.out.is_file():
            try:
                table = _parse(self.out.read_bytes(), str(self.out))
            except (OSError, ValueError) as e:
                raise ConfigError(f"Received --out {self.out}, which cannot be read as ferret scan's output ({e}); "
                                  "expected an intact earlier result (restore it, or use another --out)") from None
            yield self._same_model(table, self.out)
        for path in self.parts():
            data = path.read_bytes()
            if _digest(data) != self.manifest[path.name]["sha256"]:
                raise ConfigError(f"{path}: received bytes that changed while this scan ran; expected the part it "
                                  "committed (run the scan again: the part's rows will be scored again)")
            yield self._same_model(_parse(data, str(path)), path)

    def _same_model(self, table: Any, path: Path) -> Any:
        shas = set(table.column("model_sha256").to_pylist())
        if shas - {self.model_sha256}:
            raise ConfigError(f"{path}: received rows scored by model sha256 {sorted(shas - {self.model_sha256})[0]}; "
                              f"expected {self.model_sha256} (this model): use another --out, or remove it")
        return table

    def done(self) -> set[bytes]:
        """The inputs (their bytes, ``rows.raw``) that already have a row."""
        return {b for t in self.tables() for b in t.column("path_bytes").to_pylist()}

    # ------------------------------------------------------------------------------------ writing
    def commit(self, table: Any) -> Path:
        """One part, whole or absent, then its manifest entry."""
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(table.cast(schema()), buf)
        data = buf.getvalue()
        path = self.dir / f"{PART_PREFIX}{self.next:06d}{PART_SUFFIX}"
        try:
            atomic_write(path, data)
            self.manifest[path.name] = {"sha256": _digest(data), "rows": table.num_rows}
            self._write_manifest()
        except OSError as e:
            self.manifest.pop(path.name, None)
            raise ScanStorageError(f"{path}: cannot write ({e.strerror}); the {len(self.manifest)} parts committed "
                                   f"before are kept in {self.dir}: make room or make it writable, then run the "
                                   "same command again to continue") from None
        self.next += 1
        return path

    def _write_manifest(self) -> None:
        doc = {"format": FORMAT, "model_sha256": self.model_sha256, "parts": self.manifest}
        atomic_write(self.dir / MANIFEST, json.dumps(doc, indent=1, sort_keys=True).encode())

    def finalise(self, order: list[str]) -> Any:
        """Merge into OUT (source order; inputs no longer in the source after them), atomically; then
        remove the parts. Returns the merged table."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = list(self.tables())
        table = pa.concat_tables(tables) if tables else schema().empty_table()
        keys = table.column("path_bytes").to_pylist()
        first: dict[bytes, int] = {}
        for i, k in enumerate(keys):  # a crash between writing OUT and removing the parts repeats rows
            first.setdefault(k, i)
        rank = {raw(p): i for i, p in enumerate(order)}
        keep = sorted(first.values(), key=lambda i: (rank.get(keys[i], len(order)), i))
        table = table.take(np.asarray(keep, dtype=np.int64))
        try:
            atomic_write(self.out, lambda f: pq.write_table(table, f, row_group_size=64 * 1024))
        except OSError as e:
            raise ScanStorageError(f"{self.out}: cannot write ({e.strerror}); every row is kept in {self.dir}: make "
                                   "room or make it writable, then run the same command again to merge") from None
        shutil.rmtree(self.dir, ignore_errors=True)
        return table

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
