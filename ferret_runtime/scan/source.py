"""What a scan's SOURCE names: a folder, a Parquet or CSV manifest, or a text file of paths or URIs.

Why its own module: the run reads its inputs here before it scores anything, and a manifest's path
column may be ``path_bytes`` (a name that is not UTF-8, as ``rows`` keeps it), so a reader of
``ferret scan SOURCE`` finds every accepted form in one place.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from ..errors import ConfigError
from ..preprocess import find_images
from .rows import from_raw


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
