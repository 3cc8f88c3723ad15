"""One comparator for every export: per-output max abs/rel error, printed the same way everywhere."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ferret_runtime.errors import FerretError


class ParityError(FerretError):
    """An exported model disagrees with its PyTorch source beyond tolerance."""


@dataclass(frozen=True)
class Tolerance:
    """Element-wise ``|got - ref| <= atol + rtol * |ref|``, as numpy.allclose."""

    atol: float
    rtol: float = 0.0

    def __str__(self) -> str:
        return f"atol {self.atol:.0e}" + (f" + rtol {self.rtol:.0e}" if self.rtol else "")


@dataclass
class Comparison:
    case: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    tol: Tolerance
    passed: bool

    def __str__(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        return (f"{self.case:<28} input {str(self.shape):<20} logit max abs err {self.max_abs:.3e}  "
                f"max rel err {self.max_rel:.3e}  ({self.tol})  {verdict}")


def compare(case: str, shape: tuple[int, ...], got: np.ndarray, ref: np.ndarray, tol: Tolerance) -> Comparison:
    """Compare outputs in float64; NaN or inf anywhere fails."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        raise ParityError(f"{case}: output shape {got.shape} differs from the reference's {ref.shape}")
    diff = np.abs(got - ref)
    diff[~np.isfinite(diff)] = np.inf
    rel = diff / np.maximum(np.abs(ref), 1e-12)
    passed = bool(np.all(diff <= tol.atol + tol.rtol * np.abs(ref)))
    return Comparison(case, tuple(shape), float(diff.max(initial=0)), float(rel.max(initial=0)), tol, passed)
