"""The median-of-9 network, proven exhaustively (0-1 principle) and on tied values."""

import itertools

import numpy as np
import pytest

from ferret_runtime.lpd_spec import LPD_SPECS, MEDIAN9_NETWORK, MEDIAN9_OUTPUT, median3x3_centre, median9, prune_network


def apply(network, values: np.ndarray) -> np.ndarray:
    """Run the pruned network on rows of 9 values with numpy (an independent executor)."""
    w = [values[:, i].copy() for i in range(9)]
    for a, b, need_min, need_max in network:
        lo, hi = np.minimum(w[a], w[b]), np.maximum(w[a], w[b])
        if need_min:
            w[a] = lo
        if need_max:
            w[b] = hi
    return w[MEDIAN9_OUTPUT]


PRUNED = prune_network(MEDIAN9_NETWORK, MEDIAN9_OUTPUT)


def test_network_size():
    assert len(MEDIAN9_NETWORK) == 19
    assert sum(mn + mx for _, _, mn, mx in PRUNED) == 30  # 38 min/max before pruning


def test_zero_one_principle_all_512_inputs():
    # A comparator network selects rank r for all inputs iff it does for all 0/1 inputs.
    x = np.array(list(itertools.product([0, 1], repeat=9)), dtype=np.float32)
    np.testing.assert_array_equal(apply(PRUNED, x), np.sort(x, axis=1)[:, 4])


def test_all_ternary_inputs_with_ties():
    x = np.array(list(itertools.product([-1.0, 0.0, 2.5], repeat=9)), dtype=np.float32)
    np.testing.assert_array_equal(apply(PRUNED, x), np.median(x, axis=1))


@pytest.mark.parametrize("func", ["median", "excmed", "retmed"])
def test_shared_evaluator_with_constant_folding(func):
    # the evaluator every implementation uses, driven here by numpy ops, counting the ops it calls
    rng = np.random.default_rng(1)
    x = rng.integers(-3, 4, size=(5000, 9)).astype(np.float32)
    spec = LPD_SPECS[func]
    calls = []

    def op(fn):
        return lambda a, b: calls.append(fn) or fn(a, b)

    wires = [x[:, i] for i in range(9)]
    wires[4] = median3x3_centre(spec, wires[4])
    got = median9(wires, op(np.minimum), op(np.maximum))
    vals = x.copy()
    if spec.center == "mask":
        vals[:, 4] = 0
    if spec.center == "drop":
        vals = np.delete(vals, 4, axis=1)
    want = np.sort(vals, axis=1)[:, (vals.shape[1] - 1) // 2]
    np.testing.assert_array_equal(got, want)
    if func == "excmed":
        assert len(calls) < 30  # the -inf wire folds operations away
    else:
        assert len(calls) == 30  # a finite constant (0) or a real centre folds nothing


@pytest.mark.parametrize("constant", [0.0, -np.inf])
def test_constant_wire_gives_the_variants(constant):
    # median: centre masked to 0 -> 5th of {0, 8 neighbours}; excmed: -inf -> 4th (lower middle) of 8.
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 4, size=(20000, 9)).astype(np.float32)
    x[:, 4] = constant
    expected = np.sort(x, axis=1)[:, 4]
    if constant == -np.inf:
        expected = np.sort(np.delete(x, 4, axis=1), axis=1)[:, 3]
    np.testing.assert_array_equal(apply(PRUNED, x), expected)
