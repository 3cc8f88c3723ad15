"""Bulk scans: a source of image paths -> one Parquet file of results, resumable, locally or on Ray Data.

The unit of progress is a *part*: a few hundred rows scored and committed as one Parquet file
in ``OUT.parts/`` and recorded with its SHA-256 in that folder's manifest (``scan_store``), so a part
is whole or absent whatever kills the scan, and only parts this scan wrote are trusted. A scan
(re)started reads the inputs already in ``OUT`` and in its committed parts and scores only the
others: nothing is scored twice, nothing is lost. When every input has its row, the parts (and an
earlier ``OUT``) are merged into ``OUT`` in the source's order, atomically, and the parts removed; a
crash in between is repaired by the next run. A failure to write (read-only folder, full disk) is a
``ScanStorageError`` that keeps every committed part.

Rows: ``scan_rows`` (``path, logit, prob_fake, label, error, model_sha256, scanned_at, path_bytes``:
``ferret detect --json``'s values; an unreadable image has only ``error``; ``path_bytes`` keeps a
name that is not UTF-8). The scoring itself is :class:`Scorer`, called on a batch of inputs: in
this process for a local scan, and inside each Ray actor by ``ferret_runtime.integrations.ray``
(pyarrow, and ray, are imported on use: both are extras). Remote URIs are read by ``scan_fetch``
(one filesystem per bucket, a deadline per URI, concurrently, bounded bytes ahead of decoding).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .fileio import sha256
from .preprocess import find_images
from .scan_fetch import FETCH_TIMEOUT_S, MAX_FETCH_BYTES, Fetcher, is_uri
from .scan_rows import COLUMNS, from_raw, printable, raw, schema
from .scan_store import PartStore, ScanStorageError

__all__ = ["COLUMNS", "PartStore", "ScanStorageError", "Scorer", "is_uri", "read_source", "run_scan", "schema"]


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
        values = pq.read_table(src, columns=[column]).column(column).to_pylist()
        paths = [from_raw(p) if isinstance(p, bytes) else str(p) for p in values if p]  # path_bytes works too
    elif src.suffix.lower() == ".csv":
        with open(src, newline="", encoding="utf-8", errors="surrogateescape") as f:
            reader = csv.DictReader(f)
            if column not in (reader.fieldnames or []):
                raise ConfigError(f"{src}: received columns {reader.fieldnames}; expected a {column!r} column "
                                  "(--column)")
            paths = [row[column] for row in reader if row[column]]
    else:
        lines = src.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
        paths = [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]
    return list(dict.fromkeys(paths))  # each path once, first occurrence first


# ------------------------------------------------------------------------------------------ scoring
class Scorer:
    """One Detector and its model's SHA-256: a batch of paths (or URIs) -> a table of result rows.
    URIs are read by a :class:`~ferret_runtime.scan_fetch.Fetcher` (``fetch_timeout`` seconds each,
    at most ``max_fetch_bytes`` read ahead of decoding)."""

    def __init__(self, model: str | os.PathLike, *, model_sha256: str | None = None,
                 fetch_timeout: float = FETCH_TIMEOUT_S, max_fetch_bytes: int = MAX_FETCH_BYTES,
                 **detector_options: Any):
        from .detector import Detector

        self.model_sha256 = model_sha256 or sha256(model)
        self.fetcher = Fetcher(fetch_timeout, max_fetch_bytes)
        self.detector = Detector.open(model, **detector_options)

    def score(self, paths: list[str], blobs: list[bytes] | None = None) -> Any:
        """Rows for ``paths`` in order (a pyarrow Table); ``blobs``: the files' bytes, already read."""
        import pyarrow as pa

        fetched = (zip(paths, blobs, [True] * len(paths)) if blobs is not None else self.fetcher.fetch(paths))
        early: dict[int, str] = {}  # index -> error of an input that could not be fetched
        sent: list[int] = []  # the indices handed to the detector, in order

        def inputs() -> Iterator[tuple[str, Any]]:
            for i, (p, x, ok) in enumerate(fetched):
                if ok:
                    sent.append(i)
                    yield p, x
                else:
                    early[i] = x

        results = {sent[k]: r for k, (r, _) in enumerate(self.detector.predict_named(inputs()))}
        now = dt.datetime.now(dt.timezone.utc)
        rows: dict[str, list] = {c: [] for c in COLUMNS}
        for i, p in enumerate(paths):
            r = results.get(i)
            error = early[i] if r is None else r.error
            rows["path"].append(printable(p))
            rows["logit"].append(None if r is None else r.logit)
            rows["prob_fake"].append(None if r is None else r.prob_fake)
            rows["label"].append(None if r is None else r.label)
            rows["error"].append(None if error is None else printable(error))
            rows["model_sha256"].append(self.model_sha256)
            rows["scanned_at"].append(now)
            rows["path_bytes"].append(raw(p))
        return pa.Table.from_pydict(rows, schema=schema())

    def close(self) -> None:
        self.fetcher.close()
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
    # a binary path column holds a name's exact bytes (ferret scan sends names that are not UTF-8 so)
    paths = [from_raw(bytes(p)) if isinstance(p, (bytes, bytearray)) else str(p) for p in get(path_column)]
    return paths, ([bytes(b) for b in get(bytes_column)] if bytes_column in cols else None)


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
             fetch_timeout: float = FETCH_TIMEOUT_S, max_fetch_bytes: int = MAX_FETCH_BYTES,
             log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
             **detector_options: Any) -> ScanSummary:
    """Score every path of ``source`` not yet in ``out`` (or its parts), then merge into ``out``.

    Without ``ray_address`` the scan runs here; with it, on Ray (``"auto"``: the running cluster,
    ``"local"``: a new local instance on 127.0.0.1, else an address; an already initialised Ray is
    used as it is), ``concurrency`` actors of ``num_cpus`` / ``num_gpus`` each (None: one GPU per
    actor where the cluster has GPUs and the device is not the CPU). ``fetch_timeout`` (seconds per
    URI) and ``max_fetch_bytes`` (read ahead of decoding) bound remote reads; ``detector_options``
    go to ``Detector.open``. Raises ``ConfigError`` for a usage error and ``ScanStorageError`` when
    ``out`` cannot be written (every part committed before is kept).
    """
    if part_rows < 1 or batch_size < 1 or concurrency < 1 or not fetch_timeout > 0 or max_fetch_bytes < 1:
        raise ConfigError(f"Received part_rows {part_rows}, batch_size {batch_size}, concurrency {concurrency}, "
                          f"fetch_timeout {fetch_timeout}, max_fetch_bytes {max_fetch_bytes}; expected each > 0")
    start = time.monotonic()
    order = read_source(source, column)
    out = Path(out)
    sha = _model_sha256(model, out, source)
    options = {"fetch_timeout": fetch_timeout, "max_fetch_bytes": max_fetch_bytes, **detector_options}
    store = PartStore(out, sha, log)
    try:
        done = store.done()
        todo = [p for p in order if raw(p) not in done]
        if done:
            log(f"[scan] resuming: {len(order) - len(todo)} of {len(order)} paths already scored in {out} and "
                f"{store.dir}")
        progress = Progress(len(todo), quiet)
        scored = 0
        parts = (_score_on_ray(todo, model, sha, ray_address, part_rows, batch_size, concurrency, num_gpus,
                               num_cpus, options) if ray_address is not None and todo
                 else _score_here(todo, model, sha, part_rows, batch_size, options))
        with contextlib.closing(iter(parts)) as tables:  # on a failed commit, the scorer is closed at once
            for table in tables:
                store.commit(table)
                scored += table.num_rows
                progress.update(table.num_rows)
        progress.close()
        final = store.finalise(order)
    finally:
        store.close()
    return _summary(final, scored, time.monotonic() - start)


def _model_sha256(model: str | os.PathLike, out: Path, source: str | os.PathLike) -> str:
    """The model's SHA-256, once --out is known to name neither the model nor the source."""
    for what, other in (("the model", model), ("the source", source)):
        if out.exists() and Path(other).exists() and os.path.samefile(out, other):
            raise ConfigError(f"Received --out {out}, which is {what}; expected a new .parquet file (or an earlier "
                              "scan's result) for the results")
    try:
        return sha256(model)
    except OSError as e:
        raise ConfigError(f"Received model {str(model)!r}: cannot read it ({e.strerror}); expected a model "
                          "file") from None


def _summary(final: Any, scored: int, seconds: float) -> ScanSummary:
    labels: dict[str, int] = {}
    for label in final.column("label").to_pylist():
        if label is not None:
            labels[label] = labels.get(label, 0) + 1
    errors = [f"{p}: {e}" if not e.startswith(p) else e
              for p, e in zip(final.column("path").to_pylist(), final.column("error").to_pylist()) if e is not None]
    return ScanSummary(final.num_rows, scored, seconds, labels, errors)


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
        raise ConfigError(f"--ray needs the 'ray' extra (missing {e.name}): pip install "
                          "'ferretnet-deploy[ray]'") from None
    import pyarrow as pa

    from .integrations.ray import init_local, predict_dataset

    if not ray.is_initialized():
        if address == "local":
            init_local(logging_level="WARNING", log_to_driver=False)
        else:
            ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours reports rows/s and ETA
    # one block per part-sized slice: the actors share the work from the first block on; paths travel
    # as their bytes (a name that is not UTF-8 is no Arrow string)
    blocks = [pa.table({"path": pa.array([raw(p) for p in chunk], pa.binary())})
              for chunk in _chunks(todo, max(1, min(part_rows, -(-len(todo) // concurrency))))]
    ds = predict_dataset(ray.data.from_arrow(blocks), model, model_sha256=sha, concurrency=concurrency,
                         batch_size=batch_size, num_gpus=num_gpus, num_cpus=num_cpus, **options)
    return ds.iter_batches(batch_size=part_rows, batch_format="pyarrow")
