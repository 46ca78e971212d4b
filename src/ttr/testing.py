"""Shared numerical assertions for the test suite (DESIGN.md, "Tests").

Errors are measured as relative RMSE, ||a - b||_2 / ||b||_2, in float64, against one tolerance
table per dtype (as fla's `utils/testing.py` does). A miss raises; it never only warns.
"""

from __future__ import annotations

import torch

TOLERANCES = {torch.float64: 1e-8, torch.float32: 1e-4, torch.bfloat16: 2e-2}

_TINY = 1e-300  # keeps the ratio defined when the expected tensor is exactly zero


def rel_rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b||_2 / max(||b||_2, tiny), computed in float64."""
    a64 = a.detach().to(torch.float64)
    b64 = b.detach().to(torch.float64)
    if a64.shape != b64.shape:
        raise ValueError(f"rel_rmse: shapes differ, got {tuple(a.shape)} and {tuple(b.shape)}")
    num = torch.linalg.vector_norm(a64 - b64).item()
    den = max(torch.linalg.vector_norm(b64).item(), _TINY)
    return num / den


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 tol: float | None = None, what: str = "") -> None:
    """Raise AssertionError unless rel_rmse(actual, expected) <= tol.

    `tol` defaults to TOLERANCES[dtype], `dtype` to the lower-precision dtype of the two.
    NaN/Inf anywhere (in either tensor) is a failure.
    """
    if dtype is None:
        order = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
        rank = {d: i for i, d in enumerate(order)}
        dtype = min((actual.dtype, expected.dtype), key=lambda d: rank.get(d, len(order)))
    if tol is None:
        if dtype == torch.float16:
            dtype_tol = TOLERANCES[torch.bfloat16]
        elif dtype in TOLERANCES:
            dtype_tol = TOLERANCES[dtype]
        else:
            raise ValueError(f"assert_close: no tolerance for dtype {dtype}; pass tol=")
        tol = dtype_tol
    label = f"{what}: " if what else ""
    if actual.shape != expected.shape:
        raise AssertionError(f"{label}shape {tuple(actual.shape)} != expected "
                             f"{tuple(expected.shape)}")
    for name, x in (("actual", actual), ("expected", expected)):
        if not bool(torch.isfinite(x.detach()).all()):
            raise AssertionError(f"{label}{name} contains NaN or Inf")
    err = rel_rmse(actual, expected)
    if not err <= tol:
        raise AssertionError(f"{label}relative RMSE {err:.3e} > tolerance {tol:.1e} "
                             f"(dtype {dtype})")
