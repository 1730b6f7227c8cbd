"""Numerical comparison helpers shared by the tests and the benchmark verification table.

Tolerances are stated once, per dtype of the *inputs*.  The expected value is always computed in
float64 from the same (low-precision) inputs, so the error measured is the kernel's own rounding.
Two numbers are checked:

* ``max_err``  = max|actual - expected| / max|expected|   (worst element, scaled to the tensor)
* ``rms_err``  = ||actual - expected||_2 / ||expected||_2  (relative RMS error)

NaN or inf in ``actual`` where ``expected`` is finite always fails.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    max_err: float
    rms_err: float


TOLERANCES = {
    torch.float64: Tolerance(max_err=1e-10, rms_err=1e-11),
    torch.float32: Tolerance(max_err=2e-5, rms_err=5e-6),
    torch.float16: Tolerance(max_err=4e-3, rms_err=2e-3),
    torch.bfloat16: Tolerance(max_err=5e-2, rms_err=1.6e-2),
}


@dataclass
class Comparison:
    name: str
    dtype: torch.dtype
    max_err: float
    rms_err: float
    ok: bool
    tolerance: Tolerance

    def __str__(self) -> str:
        verdict = "PASS" if self.ok else "FAIL"
        return (f"{self.name}: max_err={self.max_err:.2e} (tol {self.tolerance.max_err:.0e}) "
                f"rms_err={self.rms_err:.2e} (tol {self.tolerance.rms_err:.0e}) {verdict}")


def compare(name: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> Comparison:
    """Compare ``actual`` (any dtype) against ``expected`` (float64) with the tolerance of ``dtype``."""
    tol = TOLERANCES[dtype]
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().to(device="cpu", dtype=torch.float64)
    e = expected.detach().to(device="cpu", dtype=torch.float64)
    if e.numel() == 0:
        return Comparison(name, dtype, 0.0, 0.0, True, tol)
    finite = torch.isfinite(e)
    bad = (~torch.isfinite(a)) & finite
    diff = (a - e)[finite].abs()
    scale = e[finite].abs().max().item() if finite.any() else 0.0
    scale = scale if scale > 0 else 1.0
    max_err = diff.max().item() / scale if diff.numel() else 0.0
    norm = e[finite].norm().item()
    rms_err = diff.norm().item() / (norm if norm > 0 else 1.0)
    ok = (not bad.any().item()) and max_err <= tol.max_err and rms_err <= tol.rms_err
    if bad.any():
        max_err = rms_err = float("inf")
    return Comparison(name, dtype, max_err, rms_err, ok, tol)


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> Comparison:
    result = compare(name, actual, expected, dtype)
    if not result.ok:
        raise AssertionError(str(result))
    return result


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with NaN (floating) or an out-of-range value, so unwritten outputs are caught."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(True if t.dtype == torch.bool else -123 if t.dtype in (torch.int8, torch.uint8) else -12345)
