"""The LPD variants of the original FerretNet, described once as data.

Every implementation (the PyTorch reference and fast ops, the ONNX graph, the CUDA kernel) reads
these specs, so a variant's padding, centre handling and reduction are never written twice.

The network sees ``x - lpd(x)``: ``lpd`` reconstructs each pixel from its k x k window.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import ConfigError


@dataclass(frozen=True)
class LPDSpec:
    """How one LPD variant reduces a k x k window (stride 1, padding k // 2)."""

    name: str
    pad_value: float  # value of out-of-image pixels
    center: str  # "mask": centre replaced by pad_value; "drop": centre left out; "keep"
    reduce: str  # "median" (lower middle for even counts, as torch.median), "min", "max", "mean"

    def count(self, k: int) -> int:
        """Number of values the reduction sees for window size k."""
        return k * k - 1 if self.center == "drop" else k * k


# Why the centre is masked: the LPD must predict a pixel from its neighbours only; keeping the centre
# in the window (``retmed``) lets the reconstruction copy the pixel itself and weakens the residual.
LPD_SPECS: dict[str, LPDSpec] = {
    s.name: s
    for s in (
        LPDSpec("median", 0.0, "mask", "median"),
        LPDSpec("excmed", 0.0, "drop", "median"),
        LPDSpec("retmed", 0.0, "keep", "median"),
        LPDSpec("min", math.inf, "mask", "min"),
        LPDSpec("max", -math.inf, "mask", "max"),
        LPDSpec("avg", 0.0, "mask", "mean"),
    )
}
LPD_FUNCS: tuple[str, ...] = (*LPD_SPECS, "origin")  # "origin": no reconstruction, x is used as is
WINDOW_SIZES: tuple[int, ...] = (3, 5, 7)


def get_lpd_spec(name: str) -> LPDSpec | None:
    """The spec for ``name``; None for ``origin``. Unknown names raise ConfigError."""
    if name == "origin":
        return None
    if name not in LPD_SPECS:
        raise ConfigError(f"Received LPD function {name!r}; expected one of {', '.join(LPD_FUNCS)}")
    return LPD_SPECS[name]


def check_window(k: int) -> int:
    """Validate an LPD window size."""
    if k not in WINDOW_SIZES:
        raise ConfigError(f"Received LPD window size {k!r}; expected one of {WINDOW_SIZES}")
    return k


# The classic 19-exchange median-of-9 network (A. Paeth, Graphics Gems, 1990; as in N. Devillard's
# opt_med9). Each pair (a, b) is a compare-exchange leaving min at a and max at b; after all of them
# position 4 holds the median (5th smallest) of the 9 inputs. Proven for all inputs by the 0-1
# principle in tests/test_median_network.py.
MEDIAN9_NETWORK: tuple[tuple[int, int], ...] = (
    (1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8),
    (0, 3), (5, 8), (4, 7), (3, 6), (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2),
)
MEDIAN9_OUTPUT = 4


def prune_network(
    network: tuple[tuple[int, int], ...], output: int
) -> list[tuple[int, int, bool, bool]]:
    """Drop the work that cannot reach ``output``.

    Returns (a, b, need_min, need_max) per remaining exchange: an exchange whose max (or min) is
    never read again needs only one of its two operations. For the median-of-9 network this leaves
    30 min/max operations instead of 38.
    """
    live = {output}
    kept: list[tuple[int, int, bool, bool]] = []
    for a, b in reversed(network):
        need_min, need_max = a in live, b in live
        if need_min or need_max:
            kept.append((a, b, need_min, need_max))
            live |= {a, b}
    kept.reverse()
    return kept


T = TypeVar("T")
Wire = Any  # an implementation's value (tensor, ONNX name, C expression) or a float constant


def median9(wires: list[Wire], min_op: Callable[[Wire, Wire], Wire], max_op: Callable[[Wire, Wire], Wire]) -> Wire:
    """Evaluate the pruned median-of-9 network over 9 wires with an implementation's min/max.

    A wire that is a Python float is a constant: +-inf operands fold away here (min(x, +inf) = x,
    min(x, -inf) = -inf, ...), so an implementation's ops are called only for real work, with at
    most one float operand (always second). Torch, ONNX and the CUDA generator share this.
    """

    def fold(a: Wire, b: Wire, is_min: bool) -> Wire:
        if isinstance(a, float) and isinstance(b, float):
            return min(a, b) if is_min else max(a, b)
        if isinstance(a, float):
            a, b = b, a
        if isinstance(b, float) and math.isinf(b):
            keeps_a = (b > 0) == is_min  # min with +inf, or max with -inf, is the other operand
            return a if keeps_a else b
        return min_op(a, b) if is_min else max_op(a, b)

    w = list(wires)
    for a, b, need_min, need_max in _MEDIAN9_PRUNED:
        lo = fold(w[a], w[b], True) if need_min else None
        if need_max:
            w[b] = fold(w[a], w[b], False)
        if need_min:
            w[a] = lo
    return w[MEDIAN9_OUTPUT]


def median3x3_centre(spec: LPDSpec, centre: Wire) -> Wire:
    """The centre wire of the 3x3 median network for a median-family spec.

    A masked centre is the constant pad value (0); a dropped centre is -inf, which makes the 5th of
    9 the 4th of the 8 neighbours, i.e. torch.median's lower middle; a kept centre is itself.
    """
    return {"mask": spec.pad_value, "drop": -math.inf}.get(spec.center, centre)


def median_rank(spec: LPDSpec, k: int) -> int:
    """0-based rank of the median among the spec's values (lower middle for even counts)."""
    return (spec.count(k) - 1) // 2


_MEDIAN9_PRUNED = prune_network(MEDIAN9_NETWORK, MEDIAN9_OUTPUT)
