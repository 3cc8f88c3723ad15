"""LPD on the CPU: the original unfold + median vs our shifted-view selection network.

Runs as a smoke test in CI (``--benchmark-disable``: each body once); ``make bench`` times them.
Memory traffic per image of C x H x W float32 for 3x3: unfold writes 9 copies (36 B/px) and the
median sorts them; the network reads 9 views of one padded copy and writes 30 intermediates.
"""

import pytest
import torch

from ferret_runtime.lpd_spec import LPD_SPECS
from ferret_train import create_model
from ferret_train.layers.lpd import lpd_fast, lpd_reference

SHAPE = (8, 3, 256, 256)  # a batch of the paper's 256x256 test crops
IMPLS = {"reference": lpd_reference, "fast": lpd_fast}


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)  # the CI machine's size; keeps runs comparable
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("func", ["median", "excmed", "avg"])
def bench_lpd_3x3(benchmark, func, impl):
    benchmark.group = f"lpd-{func}-3x3 {SHAPE}"
    x = torch.randn(SHAPE)
    out = benchmark(IMPLS[impl], x, LPD_SPECS[func], 3)
    assert out.shape == SHAPE


@pytest.mark.parametrize("impl", ["reference", "fast"])
def bench_ferretnet_s_forward(benchmark, impl):
    benchmark.group = f"ferretnet-s forward {SHAPE}"
    torch.manual_seed(0)
    model = create_model("ferretnet-s", lpd_impl=impl).eval()
    x = torch.randn(SHAPE)
    with torch.inference_mode():
        out = benchmark(model, x)
    assert out.shape == (SHAPE[0], 1)
