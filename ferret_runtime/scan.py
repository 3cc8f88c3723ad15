"""Bulk scans: a source of image paths -> one Parquet file of results, resumable, locally or on Ray Data.

The unit of progress is a *part*: a few hundred rows scored and committed as one Parquet file
(one row group) in ``OUT.parts/``, written to a temporary name and renamed (``fileio.atomic_write``),
so a part is whole or absent whatever kills the scan. A scan (re)started reads the paths already in
``OUT`` and in its committed parts and scores only the others: nothing is scored twice, nothing is
lost. When every path has its row, the parts (and an earlier ``OUT``) are merged into ``OUT`` in the
source's order, atomically, and the parts removed; a crash in between is repaired by the next run.

Rows: ``path, logit, prob_fake, label, error, model_sha256, scanned_at`` (``ferret detect --json``'s
values; an unreadable image has only ``error``). The scoring itself is :class:`Scorer`, called on
a batch of paths: in this process for a local scan, and inside each Ray actor by
``ferret_runtime.integrations.ray`` (pyarrow, and ray, are imported on use: both are extras).
"""

from __future__ import annotations

import csv
import datetime as dt
import fcntl
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .fileio import atomic_write, sha256
from .preprocess import find_images

COLUMNS = ("path", "logit", "prob_fake", "label", "error", "model_sha256", "scanned_at")
MAX_REMOTE_BYTES = 256 * 1024 * 1024  # a URI larger than this is an error row, not a download
PART_PREFIX, PART_SUFFIX = "part-", ".parquet"


def schema() -> Any:
    import pyarrow as pa

    return pa.schema([("path", pa.string()), ("logit", pa.float64()), ("prob_fake", pa.float64()),
                      ("label", pa.string()), ("error", pa.string()), ("model_sha256", pa.string()),
                      ("scanned_at", pa.timestamp("us", tz="UTC"))])


def is_uri(path: str) -> bool:
    return "://" in path


# ------------------------------------------------------------------------------------------ sources
def read_source(source: str | os.PathLike, column: str = "path") -> list[str]:
    """The paths a SOURCE names, in order, each once: a folder (its images, recursively, sorted as
    ``ferret detect`` finds them), a Parquet or CSV manifest (its ``column``), else a text file of
    paths or URIs, one a line (blank lines and ``#`` comments skipped)."""
    src = Path(source)
    if src.is_dir():
        paths = [str(p) for p in find_images([src])]
    elif not src.is_file():
        raise ConfigError(f"Received SOURCE {str(source)!r}; expected a folder, a text file of paths, or a .parquet "
                          "or .csv manifest")
    elif src.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(src).names
        if column not in names:
            raise ConfigError(f"{src}: received columns {names}; expected a {column!r} column (--column)")
        paths = [str(p) for p in pq.read_table(src, columns=[column]).column(column).to_pylist() if p]
    elif src.suffix.lower() == ".csv":
        with open(src, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if column not in (reader.fieldnames or []):
                raise ConfigError(f"{src}: received columns {reader.fieldnames}; expected a {column!r} column (--column)")
            paths = [row[column] for row in reader if row[column]]
    else:
        lines = src.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
        paths = [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]
    return list(dict.fromkeys(paths))  # each path once, first occurrence first


def _fetch(uri: str) -> str | bytes:
    """A URI's bytes through pyarrow's filesystems (s3://, gs://, hdfs://, file://); a file:// URI
    is read as a local path (the runtime's hardened file reading)."""
    if uri.startswith("file://"):
        return uri[len("file://"):]
    from pyarrow import fs

    filesystem, path = fs.FileSystem.from_uri(uri)
    size = filesystem.get_file_info(path).size
    if size is not None and size > MAX_REMOTE_BYTES:
        raise OSError(f"{size} bytes; expected at most {MAX_REMOTE_BYTES}")
    with filesystem.open_input_file(path) as f:
        return f.read()


# ------------------------------------------------------------------------------------------ scoring
class Scorer:
    """One Detector and its model's SHA-256: a batch of paths (or URIs) -> a table of result rows."""

    def __init__(self, model: str | os.PathLike, *, model_sha256: str | None = None, **detector_options: Any):
        from .detector import Detector

        self.model_sha256 = model_sha256 or sha256(model)
        self.detector = Detector.open(model, **detector_options)

    def score(self, paths: list[str], blobs: list[bytes] | None = None) -> Any:
        """Rows for ``paths`` in order (a pyarrow Table); ``blobs``: the files' bytes, already read."""
        import pyarrow as pa

        inputs: list[tuple[str, Any]] = []
        early: dict[int, str] = {}  # index -> error of an input that could not be fetched
        for i, p in enumerate(paths):
            if blobs is not None:
                inputs.append((p, blobs[i]))
            elif is_uri(p):
                try:
                    inputs.append((p, _fetch(p)))
                except Exception as e:  # any filesystem's failure is this path's error row
                    early[i] = f"{p}: cannot read ({type(e).__name__}: {e})"
                    inputs.append((p, b""))
            else:
                inputs.append((p, p))
        todo = [(i, item) for i, item in enumerate(inputs) if i not in early]
        results = dict(zip((i for i, _ in todo), (r for r, _ in self.detector.predict_named(x for _, x in todo))))
        now = dt.datetime.now(dt.timezone.utc)
        rows: dict[str, list] = {c: [] for c in COLUMNS}
        for i, p in enumerate(paths):
            r = results.get(i)
            rows["path"].append(p)
            rows["logit"].append(None if r is None else r.logit)
            rows["prob_fake"].append(None if r is None else r.prob_fake)
            rows["label"].append(None if r is None else r.label)
            rows["error"].append(early[i] if r is None else r.error)
            rows["model_sha256"].append(self.model_sha256)
            rows["scanned_at"].append(now)
        return pa.Table.from_pydict(rows, schema=schema())

    def close(self) -> None:
        self.detector.close()


def batch_paths(batch: Any, path_column: str = "path", bytes_column: str = "bytes") -> tuple[list[str], list | None]:
    """(paths, bytes or None) of a Ray Data batch: a pyarrow Table or a dict of numpy arrays (a
    ``read_binary_files(..., include_paths=True)`` dataset brings the bytes along)."""
    if hasattr(batch, "column_names"):
        cols = batch.column_names
        get = lambda c: batch.column(c).to_pylist()  # noqa: E731
    else:
        cols = list(batch)
        get = lambda c: list(batch[c])  # noqa: E731
    if path_column not in cols:
        raise ConfigError(f"Received a batch with columns {cols}; expected a {path_column!r} column")
    paths = [str(p) for p in get(path_column)]
    return paths, ([bytes(b) for b in get(bytes_column)] if bytes_column in cols else None)


# -------------------------------------------------------------------------------------------- parts
class PartStore:
    """``OUT.parts/``: committed parts, the paths done, the lock one scan holds, the final merge."""

    def __init__(self, out: str | os.PathLike, model_sha256: str):
        self.out = Path(out)
        self.dir = self.out.with_name(self.out.name + ".parts")
        self.model_sha256 = model_sha256
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.dir / ".lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise ConfigError(f"{self.dir}: received a scan already writing there; expected one scan per --out "
                              "(wait for it, or use another --out)") from None
        for stale in self.dir.glob(f".{PART_PREFIX}*.tmp"):  # what a kill left mid-write: never committed
            stale.unlink(missing_ok=True)
        self.next = 1 + max((int(p.name[len(PART_PREFIX):-len(PART_SUFFIX)]) for p in self.parts()), default=0)

    def parts(self) -> list[Path]:
        return sorted(p for p in self.dir.glob(f"{PART_PREFIX}*{PART_SUFFIX}")
                      if p.name[len(PART_PREFIX):-len(PART_SUFFIX)].isdigit())

    def tables(self) -> Iterator[Any]:
        """The earlier output, then every committed part, oldest first."""
        import pyarrow.parquet as pq

        for path in ([self.out] if self.out.is_file() else []) + self.parts():
            table = pq.read_table(path, schema=schema())
            shas = set(table.column("model_sha256").to_pylist())
            if shas - {self.model_sha256}:
                raise ConfigError(f"{path}: received rows scored by model sha256 {sorted(shas - {self.model_sha256})[0]}; "
                                  f"expected {self.model_sha256} (this model): use another --out, or remove it")
            yield table

    def done(self) -> set[str]:
        return {p for t in self.tables() for p in t.column("path").to_pylist()}

    def commit(self, table: Any) -> Path:
        """One part, whole or absent."""
        import pyarrow.parquet as pq

        path = self.dir / f"{PART_PREFIX}{self.next:06d}{PART_SUFFIX}"
        atomic_write(path, lambda f: pq.write_table(table, f))
        self.next += 1
        return path

    def finalise(self, order: list[str]) -> Any:
        """Merge into OUT (source order; paths no longer in the source after them), atomically; then
        remove the parts. Returns the merged table."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.concat_tables(list(self.tables())) if self.out.is_file() or self.parts() else schema().empty_table()
        paths = table.column("path").to_pylist()
        first: dict[str, int] = {}
        for i, p in enumerate(paths):  # a crash between writing OUT and removing the parts repeats rows
            first.setdefault(p, i)
        rank = {p: i for i, p in enumerate(order)}
        keep = sorted(first.values(), key=lambda i: (rank.get(paths[i], len(order)), i))
        table = table.take(np.asarray(keep, dtype=np.int64))
        atomic_write(self.out, lambda f: pq.write_table(table, f, row_group_size=64 * 1024))
        shutil.rmtree(self.dir, ignore_errors=True)
        return table

    def close(self) -> None:
        self._lock.close()


# -------------------------------------------------------------------------------------- the scan
@dataclass
class ScanSummary:
    rows: int  # in OUT
    scored: int  # this run
    seconds: float
    labels: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # "path: error" of OUT's error rows

    def text(self, out: Path) -> str:
        rate = self.scored / self.seconds if self.seconds > 0 else 0.0
        counts = ", ".join(f"{n} {label}" for label, n in sorted(self.labels.items())) or "no verdicts"
        lines = [f"[scan] {out}: {self.rows} rows ({counts}, {len(self.errors)} errors); {self.scored} scored in "
                 f"this run in {self.seconds:.1f} s ({rate:.1f} rows/s)"]
        lines += [f"[scan]   error: {e}" for e in self.errors[:10]]
        if len(self.errors) > 10:
            lines.append(f"[scan]   ... and {len(self.errors) - 10} more (the rows with an error in {out})")
        return "\n".join(lines)


class Progress:
    """Rows/s and ETA on stderr: one rewritten line on a terminal, else a line every few seconds."""

    def __init__(self, total: int, quiet: bool = False, every_s: float = 5.0):
        self.total, self.done, self.quiet, self.every = total, 0, quiet, every_s
        self.start = self.last = time.monotonic()
        self.tty = sys.stderr.isatty()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.quiet or (not self.tty and now - self.last < self.every and self.done < self.total):
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        line = (f"[scan] {self.done}/{self.total} rows ({100 * self.done / max(self.total, 1):.0f}%), "
                f"{rate:.1f} rows/s, ETA {eta:.0f} s")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty and not self.quiet and self.done:
            print(file=sys.stderr)


def _chunks(items: list[str], n: int) -> Iterator[list[str]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def run_scan(source: str | os.PathLike, out: str | os.PathLike, model: str | os.PathLike, *, column: str = "path",
             ray_address: str | None = None, part_rows: int = 1024, batch_size: int = 32, concurrency: int = 2,
             num_gpus: float | None = None, num_cpus: float = 1, quiet: bool = False,
             log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
             **detector_options: Any) -> ScanSummary:
    """Score every path of ``source`` not yet in ``out`` (or its parts), then merge into ``out``.

    Without ``ray_address`` the scan runs here; with it, on Ray (``"auto"``: the running cluster,
    ``"local"``: a new local instance, else an address; an already initialised Ray is used as it is),
    ``concurrency`` actors of ``num_cpus`` / ``num_gpus`` each (None: one GPU per actor where the
    cluster has GPUs and the device is not the CPU). ``detector_options`` go to ``Detector.open``.
    """
    if part_rows < 1 or batch_size < 1 or concurrency < 1:
        raise ConfigError(f"Received part_rows {part_rows}, batch_size {batch_size}, concurrency {concurrency}; "
                          "expected each >= 1")
    start = time.monotonic()
    order = read_source(source, column)
    out, sha = Path(out), sha256(model)
    store = PartStore(out, sha)
    try:
        done = store.done()
        todo = [p for p in order if p not in done]
        if done:
            log(f"[scan] resuming: {len(order) - len(todo)} of {len(order)} paths already scored in {out} and "
                f"{store.dir}")
        progress = Progress(len(todo), quiet)
        scored = 0
        for table in (_score_on_ray(todo, model, sha, ray_address, part_rows, batch_size, concurrency, num_gpus,
                                    num_cpus, detector_options) if ray_address is not None and todo
                      else _score_here(todo, model, sha, part_rows, batch_size, detector_options)):
            store.commit(table)
            scored += table.num_rows
            progress.update(table.num_rows)
        progress.close()
        final = store.finalise(order)
    finally:
        store.close()
    labels: dict[str, int] = {}
    for label in final.column("label").to_pylist():
        if label is not None:
            labels[label] = labels.get(label, 0) + 1
    errors = [f"{p}: {e}" if not e.startswith(p) else e
              for p, e in zip(final.column("path").to_pylist(), final.column("error").to_pylist()) if e is not None]
    return ScanSummary(final.num_rows, scored, time.monotonic() - start, labels, errors)


def _score_here(todo: list[str], model: str | os.PathLike, sha: str, part_rows: int, batch_size: int,
                options: dict[str, Any]) -> Iterator[Any]:
    """Parts scored in this process, by the same Scorer the Ray actors run."""
    if not todo:
        return
    scorer = Scorer(model, model_sha256=sha, batch_size=batch_size, **options)
    try:
        for chunk in _chunks(todo, part_rows):
            yield scorer.score(chunk)
    finally:
        scorer.close()


def _score_on_ray(todo: list[str], model: str | os.PathLike, sha: str, address: str, part_rows: int,
                  batch_size: int, concurrency: int, num_gpus: float | None, num_cpus: float,
                  options: dict[str, Any]) -> Iterable[Any]:
    """Parts scored by Ray Data actors (``integrations.ray``), committed here as they stream back."""
    try:
        import ray
    except ImportError as e:
        raise ConfigError(f"--ray needs the 'ray' extra (missing {e.name}): pip install 'ferretnet-deploy[ray]'") from None
    import pyarrow as pa

    from .integrations.ray import predict_dataset

    if not ray.is_initialized():
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours reports rows/s and ETA
    # one block per part-sized slice: the actors share the work from the first block on
    blocks = [pa.table({"path": chunk}) for chunk in _chunks(todo, max(1, min(part_rows, -(-len(todo) // concurrency))))]
    ds = predict_dataset(ray.data.from_arrow(blocks), model, model_sha256=sha, concurrency=concurrency,
                         batch_size=batch_size, num_gpus=num_gpus, num_cpus=num_cpus, **options)
    return ds.iter_batches(batch_size=part_rows, batch_format="pyarrow")
