"""A scan's run: a source of image paths -> one Parquet file of results, resumable, locally or on Ray Data.

The unit of progress is a *part*: a few hundred rows scored and committed as one Parquet file
in ``OUT.parts/`` and recorded with its SHA-256 in that folder's manifest (``store``), so a part
is whole or absent whatever kills the scan, and only parts this scan wrote are trusted. A scan
(re)started reads the inputs already in ``OUT`` and in its committed parts and scores only the
others: nothing is scored twice, nothing is lost. When every input has its row, the parts (and an
earlier ``OUT``) are merged into ``OUT`` in the source's order, atomically, and the parts removed; a
crash in between is repaired by the next run. A failure to write (read-only folder, full disk) is a
``ScanStorageError`` that keeps every committed part.

The inputs come from ``source``; the rows are ``rows``' schema. The scoring itself is
``scorer.Scorer``, called on a batch of inputs: in this process for a local scan, and inside each
Ray actor by ``ray`` (pyarrow, and ray, are imported on use: both are extras). This module decides
which path scores and commits what streams back; the Ray path never imports it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..fileio import sha256
from .fetch import FETCH_TIMEOUT_S, MAX_FETCH_BYTES
from .ray import score_on_ray
from .rows import raw
from .scorer import Scorer, chunks
from .source import read_source
from .store import PartStore


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
        parts = (score_on_ray(todo, model, sha, ray_address, part_rows, batch_size, concurrency, num_gpus,
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
        for chunk in chunks(todo, part_rows):
            yield scorer.score(chunk)
    finally:
        scorer.close()
