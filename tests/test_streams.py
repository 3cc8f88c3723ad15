"""One backend contract on every device, and CPU throughput streams (ONNX Runtime sessions run concurrently)."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from ferret_runtime import Detector
from ferret_runtime.backends.base import Backend, ModelInfo, Pending, Ready
from ferret_runtime.backends.onnxruntime import OrtBackend, default_streams
from ferret_runtime.preprocess import Preprocess

from .conftest import assert_logits_close, run_ferret

pytest.importorskip("onnxruntime", reason="CPU streams are ONNX Runtime sessions (the 'export' extra)")


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    import torch

    from ferret_train import create_model
    from ferret_train.checkpoint import save_checkpoint

    tmp = tmp_path_factory.mktemp("streams")
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp / "s.pth", create_model("ferretnet-s").eval())
    out = tmp / "s.onnx"
    proc = run_ferret("export", "onnx", "-w", str(ckpt), "-o", str(out), "--dynamic-hw")
    assert proc.returncode == 0, proc.stderr
    return out


def _images(n: int, size: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def test_default_streams_follow_the_core_count():
    assert [default_streams(c) for c in (1, 2, 3, 4, 16, 64)] == [1, 2, 3, 4, 4, 4]


def test_streams_are_sessions_with_a_share_of_the_threads(onnx_model):
    with OrtBackend(onnx_model, device="cpu", streams=2, threads=2) as be:
        assert be.slots == 2 and be.max_batch is None
        sessions = list(be._streams._free.queue)
        assert len(sessions) == 2 and sessions[0] is not sessions[1]
        assert [s.get_session_options().intra_op_num_threads for s in sessions] == [1, 1]
    with OrtBackend(onnx_model, device="cpu", streams=1) as be:
        assert be.slots == 1 and be._streams is None
        # the contract on the CPU too: submit runs the batch (before, a CPU OrtBackend's submit failed)
        x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
        np.testing.assert_array_equal(be.submit(x).result(), be.run(x))


def test_streams_give_the_logits_of_one_session(onnx_model):
    images = _images(40)
    with Detector.open(onnx_model, crop=None, batch_size=8, streams=1) as one:
        want = [r.logit for r in one.predict(images)]
    with Detector.open(onnx_model, crop=None, batch_size=8, streams=2) as two:
        assert two.pipelined and two.backend.slots == 2
        got = [r.logit for r in two.predict(images)]
        # several threads at once through the same two sessions: no deadlock, each gets its own logits
        with ThreadPoolExecutor(6) as pool:
            parallel = list(pool.map(lambda k: [r.logit for r in two.predict(images[k:k + 13])], range(6)))
    # one thread per session against two: another reduction order at most, within the README's parity bound
    assert_logits_close(got, want, "2 streams vs 1")
    for k, logits in enumerate(parallel):
        assert_logits_close(logits, want[k:k + 13], f"parallel caller {k}")


class _Rendezvous(Backend):
    """Two slots whose batches only finish once two of them run at the same time (a barrier):
    a Detector that waited for batch k before submitting batch k+1 would break the barrier."""

    name = "rendezvous"
    slots = 2

    def __init__(self):
        self.info = ModelInfo("test", "median", 3, Preprocess(crop=8))
        self.barrier = threading.Barrier(2, timeout=10)
        self.pool = ThreadPoolExecutor(2)
        self.free = threading.Semaphore(2)

    def run_impl(self, batch):
        return batch.reshape(len(batch), -1).mean(1)

    def submit_impl(self, batch, block):
        if not self.free.acquire(blocking=block):
            return None
        batch = batch.copy()

        def work():
            try:
                self.barrier.wait()
                return self.run_impl(batch)
            finally:
                self.free.release()

        future = self.pool.submit(work)

        class _P(Pending):
            def result(self):
                return future.result()

        return _P()


def test_detector_keeps_slots_batches_in_flight():
    images = [np.full((8, 8, 3), i, np.uint8) for i in range(16)]  # 4 batches of 4: two rendezvous
    results = Detector(_Rendezvous(), batch_size=4).predict(images)  # one batch at a time: BrokenBarrierError
    want = Detector(_Plain(), batch_size=16).predict(images)
    assert [r.path for r in results] == [r.path for r in want]
    assert [r.logit for r in results] == [r.logit for r in want]


class _Plain(Backend):
    name = "plain"

    def __init__(self):
        self.info = ModelInfo("test", "median", 3, Preprocess(crop=8))

    def run_impl(self, batch):
        return batch.reshape(len(batch), -1).mean(1)


def test_the_base_contract_runs_synchronously_and_checks_max_batch():
    be = _Plain()
    x = np.zeros((3, 3, 8, 8), np.float32)
    pending = be.submit(x)
    assert isinstance(pending, Ready) and be.slots == 1 and be.max_batch is None
    np.testing.assert_array_equal(pending.result(), be.run(x))
    be.max_batch = 2
    with pytest.raises(ValueError, match=r"Received a batch of 3; expected 1..2 per submit"):
        be.submit(x)
    with pytest.raises(ValueError, match=r"Received batch ndarray uint8"):
        be.submit(x.astype(np.uint8))


def test_cli_streams(onnx_model, tmp_path):
    from PIL import Image

    for i, img in enumerate(_images(5)):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
    rows = {}
    for n in ("1", "2"):
        proc = run_ferret("detect", str(tmp_path), "-m", str(onnx_model), "--json", "--crop", "none", "-b", "2",
                          "--streams", n)
        assert proc.returncode == 0, proc.stderr
        rows[n] = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["path"] for r in rows["1"]] == [r["path"] for r in rows["2"]] and len(rows["1"]) == 5
    assert_logits_close([r["logit"] for r in rows["2"]], [r["logit"] for r in rows["1"]], "--streams 2 vs 1")
    proc = run_ferret("detect", str(tmp_path), "-m", str(onnx_model), "--streams", "0")
    assert proc.returncode == 2 and "expected a number of streams >= 1 or 'auto'" in proc.stderr


def test_streams_on_a_backend_without_them_is_one_clear_line(tmp_path):
    from PIL import Image

    from ferret_train import create_model
    from ferret_train.checkpoint import save_checkpoint

    ckpt = save_checkpoint(tmp_path / "s.pth", create_model("ferretnet-s").eval())
    Image.fromarray(_images(1)[0]).save(tmp_path / "a.png")
    proc = run_ferret("detect", str(tmp_path / "a.png"), "-w", str(ckpt), "--streams", "2")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "received option(s) streams for the torch backend" in proc.stderr, proc.stderr


@pytest.mark.parametrize("level, member", [("disable", "ORT_DISABLE_ALL"), ("basic", "ORT_ENABLE_BASIC"),
                                           ("extended", "ORT_ENABLE_EXTENDED"), ("all", "ORT_ENABLE_ALL")])
def test_optimization_levels_map_to_onnxruntime(onnx_model, level, member):
    import onnxruntime as ort

    with OrtBackend(onnx_model, device="cpu", streams=1, optimization=level) as be:
        got = be.session.get_session_options().graph_optimization_level
    assert got == getattr(ort.GraphOptimizationLevel, member)
