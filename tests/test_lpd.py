"""Every LPD variant equals the original modules' outputs, through both implementations."""

import numpy as np
import pytest
import torch

from ferret_runtime.errors import ConfigError
from ferret_runtime.lpd_spec import LPD_SPECS
from ferret_runtime.preprocess import median_residual
from ferret_train.layers.lpd import LPD

from .conftest import lpd_tolerance


@pytest.fixture(scope="module")
def lpd_ref(reference):
    return dict(np.load(reference / "lpd_reference.npz"))


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("inp", ["continuous", "image"])
@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("func", sorted(LPD_SPECS))
def test_matches_original(lpd_ref, func, k, inp, impl):
    x = torch.from_numpy(lpd_ref[f"x_{inp}"])
    got = LPD(func, k, impl=impl)(x).numpy()
    want = lpd_ref[f"{func}_k{k}_{inp}"]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=lpd_tolerance(func, k, x))  # selections: exact


@pytest.mark.parametrize("inp", ["continuous", "image"])
def test_numpy_median_residual_matches_original(lpd_ref, inp):
    # the runtime's CPU LPD for graphs exported with --lpd external (numpy, no torch)
    x = lpd_ref[f"x_{inp}"]
    np.testing.assert_array_equal(median_residual(x), x - lpd_ref[f"median_k3_{inp}"])  # bit for bit, as claimed


@pytest.mark.parametrize("shape", [(1, 3, 1, 1), (2, 3, 2, 5), (1, 1, 31, 23), (3, 3, 64, 40)])
def test_numpy_median_residual_equals_torch_bit_for_bit(shape):
    x = np.random.default_rng(shape[-1]).integers(-2, 3, shape).astype(np.float32) / 2  # ties everywhere
    x[0, 0, 0, 0] = 7.5  # an isolated spike survives the masked median
    want = (torch.from_numpy(x) - LPD("median", 3, impl="reference")(torch.from_numpy(x))).numpy()
    got = median_residual(x)
    assert got.dtype == np.float32 and got.shape == shape
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="expected float32 \\(N, C, H, W\\)"):
        median_residual(x.astype(np.float64))


def test_reference_image_input_has_ties(lpd_ref):
    x = lpd_ref["x_image_uint8"]
    assert len(np.unique(x)) < x.size // 4  # the flat patch makes many equal neighbours


@pytest.mark.parametrize("func", sorted(LPD_SPECS))
@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("shape", [(1, 3, 1, 1), (2, 3, 2, 5), (1, 1, 31, 23)])
def test_fast_equals_reference_odd_shapes_and_ties(func, k, shape):
    g = torch.Generator().manual_seed(k)
    x = torch.randint(-2, 3, shape, generator=g).float() / 2  # few distinct values: ties everywhere
    ref = LPD(func, k, impl="reference")(x)
    fast = LPD(func, k, impl="fast")(x)
    torch.testing.assert_close(fast, ref, rtol=0, atol=lpd_tolerance(func, k, x))  # selections: exact


def test_origin_is_identity_residual():
    assert LPD("origin", 3)(torch.zeros(1, 3, 4, 4)) is None


def test_masked_median_keeps_an_isolated_spike_in_the_residual():
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 2, 2] = 1.0
    assert LPD("median", 3)(x)[0, 0, 2, 2] == 0
    x = torch.ones(1, 1, 5, 5)
    x[0, 0, 2, 2] = 9.0
    # centre masked to 0 -> the 9 values are {0, 1 x 8}: median 1; the residual keeps the spike
    assert (x - LPD("median", 3)(x))[0, 0, 2, 2] == 8.0


@pytest.mark.parametrize("bad, match", [({"func": "mean"}, "Received LPD function 'mean'"),
                                        ({"window_size": 4}, "Received LPD window size 4"),
                                        ({"impl": "cuda"}, "Received LPD impl 'cuda'")])
def test_bad_settings_name_the_problem(bad, match):
    with pytest.raises(ConfigError, match=match):
        LPD(**{"func": "median", "window_size": 3, **bad})
