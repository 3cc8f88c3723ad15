"""``ferret scan`` finishes and trusts only what it wrote: unreachable buckets (a server on 127.0.0.1
that accepts and never answers) cost about one --fetch-timeout, not one per URI; one filesystem per
bucket; bytes read ahead are bounded; file names that are not UTF-8 are kept faithfully; planted or
corrupted parts and a planted lock link are refused; a full disk, a read-only folder and --out naming
the model are one line with their own exit code, and nothing committed is lost."""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from ferret_runtime.samples import natural_image

from .conftest import run_ferret, small_onnx

pa = pytest.importorskip("pyarrow", reason="ferret scan writes Parquet with pyarrow (the 'scan' extra)")
import pyarrow.parquet as pq  # noqa: E402

from ferret_runtime.scan import PartStore, ScanStorageError, Scorer, run_scan  # noqa: E402
from ferret_runtime.scan import fetch as scan_fetch  # noqa: E402
from ferret_runtime.scan.fetch import Fetcher  # noqa: E402

N_IMAGES = 200


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return small_onnx(tmp_path_factory.mktemp("hardening_model"), "s.onnx")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    root, rng = tmp_path_factory.mktemp("hardening_images"), np.random.default_rng(11)
    paths = [root / f"{i:04d}.png" for i in range(N_IMAGES)]
    for p in paths:
        Image.fromarray(natural_image(rng, 64)).save(p)
    return paths


@pytest.fixture
def stall_port():
    """A TCP server on 127.0.0.1 that accepts connections and never answers (a bucket beyond a dead
    network); closing them at the end releases every request still waiting."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)
    conns, stop = [], threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield srv.getsockname()[1]
    stop.set()
    thread.join()
    for c in conns:
        c.close()
    srv.close()


def _uri(scheme: str, bucket: str, i: int, port: int) -> str:
    # an explicit endpoint and anonymous access: no region lookup, no credential lookup, only 127.0.0.1
    return f"{scheme}://{bucket}/img-{i}.png?endpoint_override=127.0.0.1:{port}&scheme=http&anonymous=true"


def _strip(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "scanned_at"} for r in rows]


def _one_line_error(proc: subprocess.CompletedProcess, code: int, needle: str) -> None:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("ferret scan: error:") == 1, proc.stderr
    assert needle in proc.stderr, proc.stderr


# -------------------------------------------------------------------------------------------- fetching
def test_stalled_s3_and_gs_uris_cost_about_one_timeout_and_share_one_filesystem_per_bucket(
        model, images, stall_port, tmp_path, monkeypatch):
    from pyarrow import fs

    built: list[tuple[str, dict]] = []
    for name in ("S3FileSystem", "GcsFileSystem"):  # the real classes, counted
        real = getattr(fs, name)
        monkeypatch.setattr(fs, name, lambda *a, _r=real, _n=name, **k: built.append((_n, k)) or _r(*a, **k))
    uris = [_uri(s, b, i, stall_port) for s in ("s3", "gs") for b in ("bucket-a", "bucket-b") for i in range(4)]
    source = tmp_path / "list.txt"
    source.write_text("\n".join([str(images[0])] + uris + [str(images[1])]) + "\n")
    summary = run_scan(source, tmp_path / "r.parquet", model, fetch_timeout=1.5, quiet=True, log=lambda *_: None,
                       device="cpu")
    # 16 URIs one after another would take at least 16 x 1.5 s = 24 s
    assert summary.seconds < 15, summary.seconds
    rows = {r["path"]: r for r in pq.read_table(tmp_path / "r.parquet").to_pylist()}
    assert [rows[str(p)]["label"] for p in images[:2]] == ["real", "real"]
    for u in uris:  # GCS requests never end by themselves: our deadline; S3 may give up by itself first
        e = rows[u]["error"]
        assert e.startswith(f"{u}: cannot read (") and ("no answer within 1.5 s, --fetch-timeout" in e or
                                                        (u.startswith("s3") and "Timeout was reached" in e)), e
    assert sorted(n for n, _ in built) == ["GcsFileSystem"] * 2 + ["S3FileSystem"] * 2  # one per bucket
    s3 = [k for n, k in built if n == "S3FileSystem"][0]
    assert s3["connect_timeout"] == s3["request_timeout"] == 1.5 / 4
    assert s3["endpoint_override"] == f"127.0.0.1:{stall_port}" and s3["anonymous"] is True


def test_the_cli_finishes_twenty_unreachable_uris_within_a_few_timeouts(model, images, stall_port, tmp_path):
    uris = [_uri(s, "dead", i, stall_port) for s in ("s3", "gs") for i in range(10)]
    source = tmp_path / "list.txt"
    source.write_text("\n".join(uris + [str(images[0]), f"http://127.0.0.1:{stall_port}/x.png",
                                        "s3://b/x.png?colour=blue"]) + "\n")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "ferret_runtime.cli", "scan", str(source), "--out",
                           str(tmp_path / "r.parquet"), "-m", str(model), "--device", "cpu", "--fetch-timeout", "2"],
                          capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - start
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert seconds < 25, seconds  # one after another: at least 20 x 2 s = 40 s, plus the start
    rows = {r["path"]: r for r in pq.read_table(tmp_path / "r.parquet").to_pylist()}
    assert rows[str(images[0])]["label"] == "real" and len(rows) == 23
    for u in uris:  # the first ones wait one timeout; once 3 in a row timed out, the bucket's others fail at once
        e = rows[u]["error"]
        assert sum(s in e for s in ("no answer within 2 s", "timed out in a row", "Timeout was reached")) == 1, e
    assert "cannot read (ArrowInvalid: " in rows[f"http://127.0.0.1:{stall_port}/x.png"]["error"]
    assert "received the URI option 'colour'; expected one of ['region', " in rows["s3://b/x.png?colour=blue"]["error"]


class _Objects:
    """A filesystem double: every object ``size`` bytes, read in blocks; it counts the bytes it has
    handed out and how many streams were open at once. Objects under ``stuck/`` never answer."""

    def __init__(self, size: int):
        self.size, self.lock, self.release = size, threading.Lock(), threading.Event()
        self.handed = self.open = self.most_open = 0

    def get_file_info(self, path: str) -> SimpleNamespace:
        if path.startswith("stuck/"):
            self.release.wait()
            raise OSError("released")
        return SimpleNamespace(size=self.size)

    def open_input_stream(self, path: str) -> _Stream:
        with self.lock:
            self.open += 1
            self.most_open = max(self.most_open, self.open)
        return _Stream(self, int(path.rsplit("-", 1)[1]))

    def take(self, n: int) -> None:
        with self.lock:
            self.handed += n


class _Stream:
    def __init__(self, objects: _Objects, seed: int):
        self.objects, self.seed, self.left = objects, seed, objects.size

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc) -> None:
        with self.objects.lock:
            self.objects.open -= 1

    def read(self, n: int) -> bytes:
        n = min(n, self.left, 256 * 1024)
        self.left -= n
        time.sleep(0.002)
        self.objects.take(n)
        return bytes([self.seed % 251]) * n


def test_bytes_read_ahead_are_bounded_and_a_stuck_bucket_fails_fast(monkeypatch):
    objects = _Objects(1 << 20)
    monkeypatch.setattr(scan_fetch, "build_filesystem", lambda key, timeout_s: objects)
    fetcher = Fetcher(timeout_s=10, max_bytes=3 << 20, threads=8)
    uris = [f"s3://bucket/obj-{i}" for i in range(40)]
    taken, most_ahead = 0, 0
    try:
        for i, (uri, data, ok) in enumerate(fetcher.fetch(uris)):
            assert ok and uri == uris[i] and data == bytes([i % 251]) * (1 << 20)  # in order, whole
            taken += len(data)
            time.sleep(0.01)  # a decoder slower than the reads
            most_ahead = max(most_ahead, objects.handed - taken)
        assert objects.most_open > 1  # concurrent
        assert most_ahead <= (3 << 20) + (1 << 20), most_ahead  # the budget, plus the one the decoder waits for

        stuck = Fetcher(timeout_s=0.5, max_bytes=3 << 20, threads=2)
        start = time.monotonic()
        got = list(stuck.fetch([f"gs://stuck/x-{i}" for i in range(8)] + ["gs://fine/obj-7"]))
        seconds = time.monotonic() - start
        assert seconds < 2.5, seconds  # 8 one after another: 4 s; 3 in a row time out, then the bucket fails fast
        errors = [e for _, e, ok in got[:8]]
        late = sum("no answer within 0.5 s" in e for e in errors)  # those already waiting when 3 had timed out
        assert late >= 3 and late + sum("3 reads from gs://stuck timed out in a row" in e for e in errors) == 8
        assert got[8][2] and got[8][1] == bytes([7]) * (1 << 20)  # another bucket still read
    finally:
        objects.release.set()
        fetcher.close()


# -------------------------------------------------------------------------------------------- rows
def test_file_names_that_are_not_utf8_are_scanned_and_kept_faithfully(model, images, tmp_path):
    root = tmp_path / "names"
    root.mkdir()
    odd = os.fsdecode(bytes(root) + b"/\xff\xfe-x.png")  # not UTF-8
    literal = str(root / "\\xff\\xfe-x.png")  # prints the same, is another file
    for p in (odd, literal, str(root / "plain.png")):
        shutil.copyfile(images[3], p)
    out = tmp_path / "r.parquet"
    first = run_ferret("scan", str(root), "--out", str(out), "-m", str(model), "--device", "cpu")
    assert first.returncode == 0 and "3 rows (3 real" in first.stderr, first.stderr
    rows = pq.read_table(out).to_pylist()
    names = (odd, literal, str(root / "plain.png"))
    assert sorted(r["path_bytes"] for r in rows) == sorted(os.fsencode(p) for p in names)
    by_bytes = {r["path_bytes"]: r for r in rows}
    assert by_bytes[os.fsencode(odd)]["path"] == by_bytes[os.fsencode(literal)]["path"] == literal  # printable form
    assert len({r["logit"] for r in rows}) == 1 and rows[0]["error"] is None  # the same image, three names
    assert os.path.exists(os.fsdecode(by_bytes[os.fsencode(odd)]["path_bytes"]))  # leads back to its file
    again = run_ferret("scan", str(root), "--out", str(out), "-m", str(model), "--device", "cpu")
    assert again.returncode == 0 and "0 scored in this run" in again.stderr, again.stderr
    assert _strip(pq.read_table(out).to_pylist()) == _strip(rows)


def test_an_output_and_parts_from_before_path_bytes_are_resumed(model, images, tmp_path):
    """Seven columns, no manifest (the earlier format): OUT's rows are kept, the parts scored again."""
    source = tmp_path / "list.txt"
    source.write_text("\n".join(str(p) for p in images[:6]) + "\n")
    reference = tmp_path / "reference.parquet"
    run_scan(source, reference, model, quiet=True, log=lambda *_: None, device="cpu")
    want = pq.read_table(reference)
    old = want.drop_columns(["path_bytes"])
    out = tmp_path / "r.parquet"
    pq.write_table(old.slice(0, 3), out)
    out.with_name("r.parquet.parts").mkdir()
    pq.write_table(old.slice(3, 1), out.with_name("r.parquet.parts") / "part-000001.parquet")
    logs: list[str] = []
    summary = run_scan(source, out, model, quiet=True, log=logs.append, device="cpu")
    assert "part-000001.parquet: not in the manifest" in logs[0] and "resuming: 3 of 6" in logs[1]
    assert summary.scored == 3 and _strip(pq.read_table(out).to_pylist()) == _strip(want.to_pylist())


# -------------------------------------------------------------------------------------------- parts
def test_planted_and_corrupted_parts_are_not_trusted(model, images, tmp_path):
    source = tmp_path / "list.txt"
    source.write_text("\n".join(str(p) for p in images[:12]) + "\n")
    reference = tmp_path / "reference.parquet"
    run_scan(source, reference, model, quiet=True, log=lambda *_: None, device="cpu")
    want = pq.read_table(reference).to_pylist()
    sha = want[0]["model_sha256"]

    out = tmp_path / "r.parquet"
    store, scorer = PartStore(out, sha), Scorer(model, model_sha256=sha, device="cpu")
    try:  # a scan stopped after committing two parts
        for chunk in (images[0:4], images[4:8]):
            store.commit(scorer.score([str(p) for p in chunk]))
    finally:
        scorer.close()
        store.close()
    parts = out.with_name("r.parquet.parts")
    first = parts / "part-000001.parquet"
    first.write_bytes(first.read_bytes()[:500])  # truncated
    fake = {**want[10], "logit": -50.0, "prob_fake": 0.0, "label": "real"}  # a verdict nobody computed
    pq.write_table(pa.Table.from_pylist([fake], schema=pq.read_schema(reference)), parts / "part-000099.parquet")

    proc = run_ferret("scan", str(source), "--out", str(out), "-m", str(model), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "part-000001.parquet: 500 bytes whose SHA-256 differs from the manifest's" in proc.stderr
    assert "part-000099.parquet: not in the manifest" in proc.stderr
    assert "resuming: 4 of 12 paths already scored" in proc.stderr  # part 2 only
    assert _strip(pq.read_table(out).to_pylist()) == _strip(want)  # every row computed, each once


def test_a_planted_lock_link_or_foreign_folder_is_refused_and_left_alone(model, images, tmp_path):
    source = tmp_path / "list.txt"
    source.write_text(f"{images[0]}\n")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    parts = tmp_path / "r.parquet.parts"
    parts.mkdir(mode=0o700)
    (parts / ".lock").symlink_to(victim)
    args = ("scan", str(source), "--out", str(tmp_path / "r.parquet"), "-m", str(model), "--device", "cpu")
    _one_line_error(run_ferret(*args), 2, ".lock: received a symbolic link; expected the scan's lock file")
    assert victim.read_text() == "precious"
    (parts / ".lock").unlink()
    parts.chmod(0o777)
    _one_line_error(run_ferret(*args), 2, "writable by no one else")
    shutil.rmtree(parts)
    parts.symlink_to(tmp_path, target_is_directory=True)
    _one_line_error(run_ferret(*args), 2, "r.parquet.parts: received a symbolic link; expected the scan's own")
    assert not (tmp_path / ".lock").exists() and not (tmp_path / "r.parquet").exists()


# -------------------------------------------------------------------------------------------- failures
def test_out_naming_the_model_or_the_source_is_a_usage_error(model, images, tmp_path):
    own = tmp_path / "s.onnx"
    shutil.copyfile(model, own)
    before = own.read_bytes()
    source = tmp_path / "m.parquet"
    pq.write_table(pa.table({"path": [str(images[0])]}), source)
    _one_line_error(run_ferret("scan", str(source), "--out", str(own), "-m", str(own), "--device", "cpu"), 2,
                    f"Received --out {own}, which is the model")
    _one_line_error(run_ferret("scan", str(source), "--out", str(source), "-m", str(own), "--device", "cpu"), 2,
                    f"Received --out {source}, which is the source")
    other = tmp_path / "notes.parquet"
    pq.write_table(pa.table({"x": [1]}), other)
    _one_line_error(run_ferret("scan", str(source), "--out", str(other), "-m", str(own), "--device", "cpu"), 2,
                    "which is not ferret scan's output")
    assert own.read_bytes() == before and not list(tmp_path.glob("*.parts"))


def test_a_full_disk_keeps_every_committed_part_and_the_rerun_completes(model, images, tmp_path):
    source = tmp_path / "list.txt"
    source.write_text("\n".join(str(p) for p in images) + "\n")
    out = tmp_path / "r.parquet"
    args = [sys.executable, "-m", "ferret_runtime.cli", "scan", str(source), "--out", str(out), "-m", str(model),
            "--device", "cpu", "--part-rows", "8"]
    # files over 5 KB cannot grow (EFBIG, as a full disk's ENOSPC): parts of 8 rows (about 3 KB) and the
    # manifest fit, the merged output of 200 rows does not
    limit = 5 * 1024
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    _one_line_error(proc, 3, "r.parquet: cannot write (File too large); every row is kept in")
    manifest = json.loads((tmp_path / "r.parquet.parts" / "manifest.json").read_text())
    assert sum(p["rows"] for p in manifest["parts"].values()) == N_IMAGES and not out.exists()
    rerun = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0 and f"resuming: {N_IMAGES} of {N_IMAGES} paths already scored" in rerun.stderr
    assert pq.read_table(out).num_rows == N_IMAGES and not (tmp_path / "r.parquet.parts").exists()


def test_a_write_failing_mid_scan_keeps_the_parts_before_it(model, images, tmp_path, monkeypatch):
    from ferret_runtime.scan import store as scan_store

    source = tmp_path / "list.txt"
    source.write_text("\n".join(str(p) for p in images[:20]) + "\n")
    out, real, calls = tmp_path / "r.parquet", scan_store.atomic_write, []

    def full_after_two_parts(path, data):
        calls.append(Path(path).name)
        if calls.count("manifest.json") == 2 and Path(path).name.startswith("part-"):
            raise OSError(28, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(scan_store, "atomic_write", full_after_two_parts)
    with pytest.raises(ScanStorageError, match=r"part-000003.parquet: cannot write \(No space left on device\); "
                                               r"the 2 parts committed before are kept"):
        run_scan(source, out, model, part_rows=4, quiet=True, log=lambda *_: None, device="cpu")
    monkeypatch.setattr(scan_store, "atomic_write", real)
    logs: list[str] = []
    summary = run_scan(source, out, model, part_rows=4, quiet=True, log=logs.append, device="cpu")
    assert "resuming: 8 of 20 paths already scored" in logs[0] and summary.scored == 12 and summary.rows == 20


def test_an_unwritable_output_folder_is_exit_3_with_nothing_written(model, images, tmp_path):
    source = tmp_path / "list.txt"
    source.write_text(f"{images[0]}\n")
    (tmp_path / "file").write_text("")
    under_a_file = ["scan", str(source), "--out", str(tmp_path / "file" / "r.parquet"), "-m", str(model)]
    _one_line_error(run_ferret(*under_a_file), 3, "cannot create the parts folder (Not a directory)")

    ro = tmp_path / "ro"
    ro.mkdir()
    scan = [sys.executable, "-m", "ferret_runtime.cli", "scan", str(source), "--out", str(ro / "r.parquet"), "-m",
            str(model), "--device", "cpu"]
    if os.geteuid() != 0:
        ro.chmod(0o555)
        proc = subprocess.run(scan, capture_output=True, text=True, timeout=300)
        ro.chmod(0o755)
        _one_line_error(proc, 3, "cannot create the parts folder (Permission denied)")
        return
    # root ignores permission bits: a read-only bind mount of the folder, in a mount namespace of its own
    if not shutil.which("unshare") or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.skip("running as root without unshare -m: no way to make a folder read-only for root")
    proc = subprocess.run(["unshare", "-m", "sh", "-c", 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0" '
                           '&& exec "$@"', str(ro), *scan], capture_output=True, text=True, timeout=300)
    _one_line_error(proc, 3, "cannot create the parts folder (Read-only file system)")
    assert not list(ro.iterdir())
