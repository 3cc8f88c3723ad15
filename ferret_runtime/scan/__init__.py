"""Bulk scans (``ferret scan``): a dataset -> one Parquet file of results, resumable, here or on Ray Data.

One folder, one module per stage, each beneath the next: ``rows`` (the schema, and file names that
are not UTF-8) under ``scorer`` (a batch of inputs -> rows, what both paths run) and ``store``
(``OUT.parts/``: parts, manifest, lock); ``fetch`` reads remote URIs for the scorer, ``source``
reads what SOURCE names; ``ray`` is the Ray Data path (``FerretPredictor`` for ``map_batches``), and
``run`` the scan itself (resume, commit, merge), which scores here or through ``ray``. This module is
the public API; pyarrow and ray (extras) are imported on use.
"""

from __future__ import annotations

from .fetch import is_uri
from .ray import FerretPredictor, init_local, predict_dataset
from .rows import COLUMNS, schema
from .run import ScanSummary, run_scan
from .scorer import Scorer
from .source import read_source
from .store import PartStore, ScanStorageError

__all__ = ["COLUMNS", "FerretPredictor", "PartStore", "ScanStorageError", "ScanSummary", "Scorer", "init_local",
           "is_uri", "predict_dataset", "read_source", "run_scan", "schema"]
