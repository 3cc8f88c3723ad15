"""Remote inputs of a scan (``s3://``, ``gs://``, ``hdfs://``, ...): bytes within a deadline, concurrently.

Why: a new filesystem per URI, no timeout and one URI after another made one unreachable ``s3://``
URI cost 338 s and a ``gs://`` one 1,088 s (GCS retries for 15 minutes; pyarrow gives its requests no
timeout at all). Here

- one filesystem per (scheme, bucket or host, query options), built once and shared; a bucket that
  cannot be reached fails once, and every URI in it gets that error row at once;
- every URI is read within ``timeout_s`` of its fetch starting (``--fetch-timeout``, default 30 s):
  S3 gets a quarter of it as its connect and request timeouts (3 attempts), GCS as its retry limit,
  and a wait in this module enforces it for all (a GCS request that stalls never returns by
  itself); past it, an error row;
- ``threads`` URIs (16) are fetched at once, in source order, and the bytes read ahead of decoding
  are bounded (``--max-fetch-mb``, default 256 MB: a fetch waits for room, except the one the
  decoder waits for); an object over ``MAX_REMOTE_BYTES`` (256 MB) is an error row, not a download;
- after ``STALLS_PER_BUCKET`` (3) timeouts in a row on one bucket (failures after half the deadline
  count too), its remaining URIs fail at once
  (a dead endpoint costs one timeout, not one per URI); a thread stuck past its deadline is
  replaced, at most ``4 * threads`` times, so stuck requests never stop the scan.

The query options pyarrow's ``FileSystem.from_uri`` takes still work (``region``,
``endpoint_override``, ``scheme``, ``tls_ca_file_path`` for S3; ``endpoint_override``, ``scheme``,
``project_id``, ``retry_limit_seconds`` for GCS), and ``anonymous=true`` skips the credential lookup
(``s3://bucket/key.png?endpoint_override=127.0.0.1:9000&scheme=http``); any other is that URI's
error row. Without ``region`` or an endpoint, an S3 bucket's region is looked up once, within the
deadline.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

FETCH_TIMEOUT_S = 30.0
MAX_FETCH_BYTES = 256 * 1024 * 1024  # read ahead of decoding, all URIs together
MAX_REMOTE_BYTES = 256 * 1024 * 1024  # one URI larger than this is an error row, not a download
FETCH_THREADS = 16
STALLS_PER_BUCKET = 3
_BLOCK = 1 << 20  # reads in blocks, so a fetch given up on stops at the next block
# the query options pyarrow's FileSystem.from_uri takes (bucket creation flags are moot: a scan only
# reads), and ``anonymous`` (no credential lookup)
_GCS = ("endpoint_override", "scheme", "anonymous", "project_id", "retry_limit_seconds")
_OPTIONS = {"s3": ("region", "endpoint_override", "scheme", "anonymous", "tls_ca_file_path", "allow_bucket_creation",
                   "allow_bucket_deletion"), "gs": _GCS, "gcs": _GCS}


class FetchError(OSError):
    """Why a URI was not read, in words (its row's error says ``cannot read (<this>)``)."""


class _Skipped(FetchError):
    """Not tried: its bucket timed out too often (no news about the bucket either way)."""


def is_uri(path: str) -> bool:
    return "://" in path


def split_uri(uri: str) -> tuple[tuple, str]:
    """(filesystem key, path inside it) of a URI; ``ValueError`` for an option the scheme does not take."""
    parts = urlsplit(uri, allow_fragments=False)
    scheme, query = parts.scheme.lower(), tuple(sorted(parse_qsl(parts.query, keep_blank_values=True)))
    allowed = _OPTIONS.get(scheme, ())
    for k, _ in query:
        if k not in allowed:
            raise ValueError(f"received the URI option {k!r}; expected one of {list(allowed)} for {scheme}://")
    path = unquote(parts.path)
    return (scheme, parts.netloc, query), (parts.netloc + path if scheme in _OPTIONS else path)


def build_filesystem(key: tuple, timeout_s: float) -> Any:
    """One pyarrow filesystem for a (scheme, bucket or host, options) key, with our timeouts."""
    from pyarrow import fs

    scheme, netloc, query = key
    opts: dict[str, Any] = dict(query)
    if "anonymous" in opts:
        opts["anonymous"] = opts["anonymous"].lower() in ("1", "true", "yes")
    for moot in ("allow_bucket_creation", "allow_bucket_deletion"):
        opts.pop(moot, None)
    if scheme == "s3":
        env = os.environ
        endpoint = opts.get("endpoint_override") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        if "region" not in opts and not endpoint:  # AWS itself: the bucket's region, as from_uri finds it
            opts["region"] = fs.resolve_s3_region(netloc)
        # 3 attempts of a quarter of the deadline each: S3 reports its own error (more telling than
        # ours) before the deadline, and a thread given up on ends by itself (pyarrow waits for S3
        # requests still running when the interpreter exits)
        return fs.S3FileSystem(connect_timeout=timeout_s / 4, request_timeout=timeout_s / 4,
                               retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=3), **opts)
    if scheme in ("gs", "gcs"):
        limit = min(timeout_s, float(opts.pop("retry_limit_seconds", timeout_s)))
        return fs.GcsFileSystem(retry_time_limit=dt.timedelta(seconds=max(1.0, limit)), **opts)
    return fs.FileSystem.from_uri(f"{scheme}://{netloc}/")[0]


@dataclass(eq=False)
class _Job:
    index: int
    uri: str
    key: tuple = ()
    started: float | None = None  # the deadline's clock (paused while waiting for room)
    waiting_room: bool = False
    held: int = 0  # bytes of the read-ahead budget it holds
    done: bool = False
    abandoned: bool = False
    result: bytes | str = b""  # the bytes, or the error
    ok: bool = False


@dataclass(eq=False)
class _Built:
    ready: threading.Event = field(default_factory=threading.Event)
    fs: Any = None
    error: str | None = None


class Fetcher:
    """URIs -> bytes or an error each, in order, by a pool of worker threads (see the module docstring)."""

    def __init__(self, timeout_s: float = FETCH_TIMEOUT_S, max_bytes: int = MAX_FETCH_BYTES,
                 threads: int = FETCH_THREADS):
        if not timeout_s > 0 or max_bytes < 1 or threads < 1:
            raise ValueError(f"Received fetch timeout {timeout_s} s, {max_bytes} bytes in flight, {threads} "
                             "threads; expected each > 0")
        self.timeout_s, self.max_bytes, self.threads = timeout_s, max_bytes, threads
        self._cond = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._used = 0  # budget bytes held by fetched-or-fetching jobs
        self._head: _Job | None = None  # the job the consumer waits for: it never waits for room
        self._filesystems: dict[tuple, _Built] = {}
        self._stalls: dict[tuple, int] = {}
        self._workers = 0  # worker threads not stuck on an abandoned job
        self._spares = 4 * threads  # replacements left for threads stuck past their deadline
        self._closed = False

    # --------------------------------------------------------------------------------- consumer side
    def fetch(self, paths: list[str]) -> Iterator[tuple[str, bytes | str, bool]]:
        """(path, bytes or local path, True) or (path, error, False) for each path, in order."""
        jobs = {i: _Job(i, p) for i, p in enumerate(paths) if is_uri(p) and not p.startswith("file://")}
        with self._cond:
            self._queue.extend(jobs.values())
            self._start_workers(min(self.threads, len(self._queue)) - self._workers)
            self._cond.notify_all()
        try:
            for i, p in enumerate(paths):
                if p.startswith("file://"):
                    yield p, p[len("file://"):], True
                elif i not in jobs:
                    yield p, p, True
                else:
                    job = self._wait(jobs[i])
                    with self._cond:  # handed to the decoder: no longer read ahead
                        self._release(job)
                    yield p, job.result, job.ok
        finally:  # the consumer may stop early: nobody will take the rest
            with self._cond:
                for job in jobs.values():
                    if job.done:
                        self._release(job)
                    else:
                        self._drop(job)

    def _wait(self, job: _Job) -> _Job:
        with self._cond:
            self._head = job
            self._cond.notify_all()
            while not job.done:
                if job.started is None and self._workers == 0:
                    self._drop(job)
                    self._finish(job, "not fetched: every fetch thread is stuck on an earlier URI past its deadline")
                    break
                running = job.started is not None and not job.waiting_room
                left = job.started + self.timeout_s - time.monotonic() if running else None
                if left is not None and left <= 0:
                    self._abandon(job)
                    break
                self._cond.wait(left)
            return job

    def _abandon(self, job: _Job) -> None:
        """Past its deadline: an error row now; its thread, still inside the filesystem, is replaced."""
        self._drop(job)
        self._finish(job, f"cannot read (no answer within {self.timeout_s:g} s, --fetch-timeout)")
        self._stalls[job.key] = self._stalls.get(job.key, 0) + 1
        if self._spares > 0 and not self._closed:
            self._spares -= 1
            self._start_workers(1)

    def _drop(self, job: _Job) -> None:
        """Nobody will take this job's result: off the queue, or its thread left to end by itself
        (it no longer counts as a worker) and its bytes returned to the budget."""
        job.abandoned = True
        if job.started is None:
            self._queue.remove(job)
            job.done = True
        else:
            self._workers -= 1
        self._release(job)

    def _release(self, job: _Job) -> None:
        self._used -= job.held
        job.held = 0
        self._cond.notify_all()

    def _finish(self, job: _Job, error: str) -> None:
        job.result, job.ok, job.done = f"{job.uri}: {error}", False, True
        self._cond.notify_all()

    def close(self) -> None:
        """Stop the workers; waits for the ones still reading at most one timeout (a thread inside
        pyarrow's S3 at interpreter exit can hang it)."""
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()
            deadline = time.monotonic() + self.timeout_s + 1
            while self._workers > 0 and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())

    # ----------------------------------------------------------------------------------- worker side
    def _start_workers(self, n: int) -> None:
        for _ in range(n):
            self._workers += 1
            threading.Thread(target=self._work, name="ferret-fetch", daemon=True).start()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    if not self._cond.wait(5.0) and not self._queue:
                        break  # idle: this thread ends; fetch() starts others when work comes
                if self._closed or not self._queue:
                    self._workers -= 1
                    self._cond.notify_all()
                    return
                job = self._queue.popleft()
                job.started = time.monotonic()
                self._cond.notify_all()  # the consumer may wait for this job: its deadline now runs
            self._run(job)
            with self._cond:
                if job.abandoned:  # given up on (and replaced): this thread is surplus now, and ends
                    self._release(job)
                    return

    def _run(self, job: _Job) -> None:
        try:
            job.key, path = split_uri(job.uri)
            data = self._read(job, self._filesystem(job), path)
        except _Skipped as e:
            with self._cond:
                if not job.abandoned:
                    self._finish(job, f"cannot read ({e})")
            return
        except Exception as e:  # noqa: BLE001 - any filesystem's failure is this input's error row
            error, data = f"cannot read ({'' if isinstance(e, FetchError) else type(e).__name__ + ': '}{e})", None
        with self._cond:
            if job.abandoned:
                return
            # a failure after half the deadline is a stall too (S3 gives up on a dead endpoint by itself);
            # a quick one (not found, denied) shows the endpoint answers
            slow = data is None and time.monotonic() - job.started >= self.timeout_s / 2
            self._stalls[job.key] = self._stalls.get(job.key, 0) + 1 if slow else 0
            if data is None:
                self._finish(job, error)
            else:
                job.result, job.ok, job.done = data, True, True
                self._cond.notify_all()

    def _filesystem(self, job: _Job) -> Any:
        with self._cond:
            if self._stalls.get(job.key, 0) >= STALLS_PER_BUCKET:
                raise _Skipped(f"{STALLS_PER_BUCKET} reads from {job.key[0]}://{job.key[1]} timed out in a row; "
                                   "its other URIs are not tried in this run")
            built = self._filesystems.get(job.key)
            mine = built is None
            if mine:
                built = self._filesystems[job.key] = _Built()
        if mine:
            try:
                built.fs = build_filesystem(job.key, self.timeout_s)
            except Exception as e:  # noqa: BLE001 - every URI of this bucket gets the same error
                built.error = f"{type(e).__name__}: {e}"
            built.ready.set()
        built.ready.wait()
        if built.error is not None:
            raise FetchError(built.error)
        return built.fs

    def _read(self, job: _Job, filesystem: Any, path: str) -> bytes:
        size = filesystem.get_file_info(path).size
        if size is not None and size > MAX_REMOTE_BYTES:
            raise FetchError(f"received {size} bytes; expected at most {MAX_REMOTE_BYTES}")
        self._reserve(job, size or 0)
        chunks, total = [], 0
        with filesystem.open_input_stream(path) as f:
            while block := f.read(_BLOCK):
                if job.abandoned:
                    raise FetchError("given up on")
                total += len(block)
                if total > MAX_REMOTE_BYTES:
                    raise FetchError(f"received more than {MAX_REMOTE_BYTES} bytes; expected at most that")
                chunks.append(block)
        return b"".join(chunks)

    def _reserve(self, job: _Job, size: int) -> None:
        """Wait for room in the read-ahead budget (not counted against the deadline), unless the
        consumer waits for this job or nothing else holds any."""
        with self._cond:
            paused = time.monotonic()
            job.waiting_room = True
            while self._used and self._used + size > self.max_bytes and self._head is not job and not job.abandoned:
                self._cond.wait()
            job.waiting_room = False
            job.started += time.monotonic() - paused
            self._cond.notify_all()
            job.held = size
            self._used += size
