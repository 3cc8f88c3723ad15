"""The scoring both scan paths share: a batch of inputs -> a table of result rows.

Why its own module: a local scan (``run``) and each Ray actor (``ray``) run this same :class:`Scorer`,
so it sits beneath both and neither path imports the other's code. Rows are ``rows``' schema; remote
URIs are read by ``fetch``. pyarrow (an extra) and the Detector's backend are imported on use.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from typing import Any

from ..fileio import sha256
from .fetch import FETCH_TIMEOUT_S, MAX_FETCH_BYTES, Fetcher
from .rows import COLUMNS, printable, raw, schema


class Scorer:
    """One Detector and its model's SHA-256: a batch of paths (or URIs) -> a table of result rows.
    URIs are read by a :class:`~ferret_runtime.scan.fetch.Fetcher` (``fetch_timeout`` seconds each,
    at most ``max_fetch_bytes`` read ahead of decoding)."""

    def __init__(self, model: str | os.PathLike, *, model_sha256: str | None = None,
                 fetch_timeout: float = FETCH_TIMEOUT_S, max_fetch_bytes: int = MAX_FETCH_BYTES,
                 **detector_options: Any):
        from ..detector import Detector

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


def chunks(items: list[str], n: int) -> Iterator[list[str]]:
    """``items`` in consecutive slices of ``n`` (the last may be shorter): a part's, or a Ray block's, inputs."""
    for i in range(0, len(items), n):
        yield items[i:i + n]
