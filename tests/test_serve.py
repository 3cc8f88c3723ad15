"""``ferret serve`` as a real server on 127.0.0.1 with a real HTTP client; the dynamic batcher in process."""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from ferret_runtime import Detector
from ferret_runtime.backends.base import Backend, ModelInfo
from ferret_runtime.batching import DynamicBatcher, Overloaded
from ferret_runtime.preprocess import Preprocess

from .conftest import logit_tolerance, run_ferret

httpx = pytest.importorskip("httpx", reason="the tests' HTTP client is httpx (the 'dev' extra)")
pytest.importorskip("starlette", reason="ferret serve needs the 'serve' extra")

from . import serving  # noqa: E402 (after the importorskips: serving needs httpx)
from .serving import png as _png  # noqa: E402
from .serving import server  # noqa: E402

tiny_ckpt = serving.tiny_ckpt  # a shared fixture


@pytest.fixture(scope="module")
def ref_logits(reference):
    return json.loads((reference / "reference_logits.json").read_text())["images"]


def test_serve_detect_cli_and_api_agree_with_the_reference(authors_ckpt, reference, ref_logits):
    names = sorted(ref_logits)
    paths = [reference / "images" / n for n in names]
    with Detector.open(authors_ckpt) as det:
        api = {n: r.logit for n, r in zip(names, det.predict(paths))}
    cli = {Path(row["path"]).name: row["logit"] for row in
           map(json.loads,
               run_ferret("detect", *map(str, paths), "-w", str(authors_ckpt), "--json").stdout.splitlines())}
    with server("-w", str(authors_ckpt), "--max-delay-ms", "20") as srv:
        with httpx.Client(base_url=srv.url, timeout=120) as client, ThreadPoolExecutor(len(paths)) as pool:
            # one raw-body request per image, all at once (the batcher gathers them) ...
            raw = list(pool.map(lambda p: client.post("/v1/detect", content=p.read_bytes()), paths))
            # ... and all of them in one multipart request
            multi = client.post("/v1/detect", files=[("file", (p.name, p.read_bytes(), "image/png")) for p in paths])
            metrics = client.get("/metrics").text
    assert all(r.status_code == 200 for r in raw), [r.text for r in raw]
    served_raw = {n: r.json()["results"][0] for n, r in zip(names, raw)}
    assert multi.status_code == 200
    served_multi = {row["path"]: row for row in multi.json()["results"]}
    for n in names:
        assert served_raw[n]["path"] == "<body>"
        want = ref_logits[n]["logit_center_crop_256"]
        for got in (api[n], cli[n], served_raw[n]["logit"], served_multi[n]["logit"]):
            assert abs(got - want) <= logit_tolerance(want), (n, got, want)  # the README's parity bound
        assert served_multi[n]["logit"] == pytest.approx(api[n], abs=1e-5)
        assert served_raw[n]["label"] == ref_logits[n]["label"]
    assert f'ferret_requests_total{{code="200"}} {len(paths) + 1}.0' in metrics
    assert f"ferret_images_total {2 * len(paths)}.0" in metrics
    assert "ferret_batch_size_bucket" in metrics and "ferret_request_latency_seconds_count" in metrics
    assert "ferret_queue_depth 0.0" in metrics


def test_overload_503_and_every_request_answered_once(tiny_ckpt):
    n = 48
    body = _png(256)
    with server("-w", str(tiny_ckpt), "--max-queue", "1", "--max-batch", "1", "--max-delay-ms", "0",
                "--workers", "1") as srv:
        with httpx.Client(base_url=srv.url, timeout=120, limits=httpx.Limits(max_connections=n)) as client, \
                ThreadPoolExecutor(n) as pool:
            responses = list(pool.map(lambda i: client.post("/v1/detect", content=body, headers={"X-Id": str(i)}),
                                      range(n)))
            metrics = client.get("/metrics").text
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) >= 1 and codes.count(200) >= 1, codes
    for r in responses:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1" and "overloaded" in r.json()["error"]
        else:
            assert len(r.json()["results"]) == 1
    # the server counted exactly one answer per request, and classified exactly the accepted ones
    assert f'ferret_requests_total{{code="200"}} {codes.count(200)}.0' in metrics
    assert f'ferret_requests_total{{code="503"}} {codes.count(503)}.0' in metrics
    assert f"ferret_images_total {codes.count(200)}.0" in metrics


def test_concurrent_clients_each_get_their_own_images_logit(tiny_ckpt):
    n = 32
    bodies = [_png(64 + i, seed=i) for i in range(n)]  # every image different, sizes too (several batch groups)
    with Detector.open(tiny_ckpt) as det:
        want = [r.logit for r in det.predict(bodies)]
    with server("-w", str(tiny_ckpt), "--max-delay-ms", "20") as srv:
        with httpx.Client(base_url=srv.url, timeout=120, limits=httpx.Limits(max_connections=n)) as client, \
                ThreadPoolExecutor(n) as pool:
            responses = list(pool.map(lambda b: client.post("/v1/detect", content=b), bodies))
    assert [r.status_code for r in responses] == [200] * n
    got = [r.json()["results"][0]["logit"] for r in responses]
    assert got == pytest.approx(want, abs=1e-5)


def test_bad_empty_and_oversized_bodies(tiny_ckpt):
    with server("-w", str(tiny_ckpt), "--max-body-mb", "0.05") as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            bad = client.post("/v1/detect", content=b"definitely not an image")
            empty = client.post("/v1/detect", content=b"")
            big = client.post("/v1/detect", content=b"\0" * 100_000)
            mixed = client.post("/v1/detect", files=[("f", ("ok.png", _png(64), "image/png")),
                                                      ("f", ("broken.png", b"\x89PNG broken", "image/png"))])
            ok = client.post("/v1/detect", content=_png(64))
            assert client.get("/healthz").text == "ok"
    assert bad.status_code == 400 and "<body>: not an image Pillow can identify" in bad.json()["error"]
    assert empty.status_code == 400 and "no image" in empty.json()["error"]
    assert big.status_code == 413 and "0.05 MB" in big.json()["error"]
    assert mixed.status_code == 400 and "broken.png" in mixed.json()["error"] and "ok.png" not in mixed.json()["error"]
    assert ok.status_code == 200


def test_sigterm_finishes_in_flight_requests_then_exits(tiny_ckpt):
    # requests wait up to 1.5 s in the batcher for company: SIGTERM arrives while they are in flight
    with server("-w", str(tiny_ckpt), "--max-delay-ms", "1500", "--max-batch", "64") as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as client, ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(client.post, "/v1/detect", content=_png(64, i)) for i in range(6)]
            time.sleep(0.5)
            srv.proc.send_signal(signal.SIGTERM)
            responses = [f.result() for f in futures]
        assert srv.proc.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM after a clean shutdown
        log = srv.log()
    assert [r.status_code for r in responses] == [200] * 6
    assert "[serve] shut down after 6 images in 1 batches" in log, log  # all six ran, together, before exiting
    assert all(len(r.json()["results"]) == 1 for r in responses)


def test_serve_usage_errors(tmp_path):
    proc = run_ferret("serve", "-w", str(tmp_path / "absent.pth"))
    assert proc.returncode == 2 and "absent.pth: no such checkpoint file" in proc.stderr
    proc = run_ferret("serve", "-w", str(tmp_path / "x.pth"), "--max-batch", "0")
    assert proc.returncode == 2 and "--max-batch 0" in proc.stderr


# --------------------------------------------------------------------------- the batcher in process
class _SlowSum(Backend):
    """A deterministic backend (logit = mean pixel value) that records batch sizes and can be held."""

    name = "test"

    def __init__(self):
        self.info = ModelInfo("test", "median", 3, Preprocess(crop=8))
        self.sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def run_impl(self, batch):
        self.gate.wait()
        self.sizes.append(len(batch))
        return batch.reshape(len(batch), -1).mean(1)


def test_batcher_groups_concurrent_requests_and_keeps_order():
    backend = _SlowSum()
    det = Detector(backend, batch_size=16)
    imgs = [np.full((8, 8, 3), i, np.uint8) for i in range(64)]
    with DynamicBatcher(det, max_batch=16, max_delay_ms=50) as b, ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda i: b.predict(imgs[i], f"img{i}"), range(64)))
    expected = Detector(_SlowSum(), batch_size=1).predict(imgs)
    assert [r.path for r in results] == [f"img{i}" for i in range(64)]
    assert [r.logit for r in results] == [r.logit for r in expected]
    assert sum(backend.sizes) == 64 and max(backend.sizes) <= 16 and len(backend.sizes) < 64


def test_batcher_overload_fails_fast_and_close_drains():
    backend = _SlowSum()
    backend.gate.clear()  # hold the backend: requests pile up
    det = Detector(backend, batch_size=4)
    b = DynamicBatcher(det, max_batch=1, max_delay_ms=0, max_queue=2, in_flight=1)
    img = np.zeros((8, 8, 3), np.uint8)
    accepted, rejected = [], 0
    for _ in range(10):
        try:
            accepted.append(b.submit(img))
        except Overloaded as e:
            rejected += 1
            assert "2 already queued" in str(e)
    assert rejected >= 1 and len(accepted) + rejected == 10
    backend.gate.set()
    b.close(drain=True)
    want = Detector(_SlowSum()).predict(img)[0].logit
    assert [f.result(timeout=10).logit for f in accepted] == [want] * len(accepted)
    with pytest.raises(Exception, match="after shutdown"):
        b.submit(img)


def test_batcher_queues_a_request_whole_or_not_at_all():
    backend = _SlowSum()
    backend.gate.clear()
    b = DynamicBatcher(Detector(backend), max_batch=1, max_delay_ms=0, max_queue=4, in_flight=1)
    img = np.zeros((8, 8, 3), np.uint8)
    held = [b.submit(img), b.submit(img)]  # one held in the backend, the next by the collector waiting for it
    deadline = time.monotonic() + 10
    while b.queue_depth and time.monotonic() < deadline:
        time.sleep(0.01)
    queued = b.submit_many([(f"a{i}", img) for i in range(3)])
    with pytest.raises(Overloaded, match="Received a request of 2 image"):
        b.submit_many([("b0", img), ("b1", img)])  # one would fit, two do not: neither is queued
    assert b.queue_depth == 3
    backend.gate.set()
    b.close()
    assert [f.result(timeout=10).path for f in queued] == ["a0", "a1", "a2"]
    assert all(f.result(timeout=10).error is None for f in held)
