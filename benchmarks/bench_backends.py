"""FerretNet-B at batch 32, 256x256 on the CPU: the faithful PyTorch reference (unfold + median)
vs our PyTorch eager (fast LPD) vs ONNX Runtime CPU on our export, side by side in one run.

``make bench`` times them; CI runs each body once (``--benchmark-disable``).
"""

import numpy as np
import pytest
import torch

from ferret_export.bench.runners import steady_state
from ferret_export.onnx.export import export_onnx
from ferret_export.onnx.graph import GraphOptions
from ferret_runtime.backends.onnxruntime import OrtBackend
from ferret_train import create_model
from ferret_train.checkpoint import save_checkpoint

BATCH, SIZE, THREADS = 32, 256, 2  # THREADS: the CI machine's cores, for every backend alike


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    model = create_model("ferretnet-b").eval()
    ckpt = save_checkpoint(tmp / "b.pth", model)
    export_onnx(ckpt, tmp / "b.onnx", GraphOptions(input_size=SIZE), run_verify=False, log=lambda *_: None)
    x = np.random.default_rng(0).standard_normal((BATCH, 3, SIZE, SIZE)).astype(np.float32)
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield ckpt, tmp / "b.onnx", x
    torch.set_num_threads(old)


@pytest.mark.parametrize("impl", ["reference", "fast"])
def bench_pytorch_eager(benchmark, setup, impl):
    benchmark.group = f"ferretnet-b b={BATCH} {SIZE}x{SIZE} CPU {THREADS} threads"
    ckpt, _, x = setup
    model = create_model("ferretnet-b", lpd_impl=impl).eval()
    model.load_state_dict(torch.load(ckpt, weights_only=True)["model"])
    xt = torch.from_numpy(x)
    with torch.inference_mode():
        out = benchmark.pedantic(model, (xt,), rounds=3, warmup_rounds=1)
    assert out.shape == (BATCH, 1)


def bench_onnxruntime_cpu(benchmark, setup):
    benchmark.group = f"ferretnet-b b={BATCH} {SIZE}x{SIZE} CPU {THREADS} threads"
    _, onnx_path, x = setup
    with OrtBackend(onnx_path, threads=THREADS, streams=1) as backend:  # one session with every thread
        out = benchmark.pedantic(backend.run, (x,), rounds=3, warmup_rounds=1)
    assert out.shape == (BATCH,)


def bench_onnxruntime_cpu_streams(benchmark, setup):
    """THREADS one-thread sessions, one batch each in flight: one call is THREADS batches."""
    benchmark.group = f"ferretnet-b b={BATCH} {SIZE}x{SIZE} CPU {THREADS} threads"
    _, onnx_path, x = setup
    with OrtBackend(onnx_path, threads=THREADS, streams=THREADS) as backend:
        call, per_call = steady_state(backend, x)
        benchmark.pedantic(call, rounds=3, warmup_rounds=1)
    assert backend.slots == THREADS and per_call == THREADS * BATCH
