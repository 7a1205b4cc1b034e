"""Accuracy metrics and adversarial inputs shared by the kernel tests and ``bench/kernels.py``."""

from __future__ import annotations

import torch

from kernels.layout import FP8_DTYPE, FP8_MAX

__all__ = ["calc_diff", "rel_error", "e4m3_edge_values", "poison"]


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """``1 − 2⟨x,y⟩ / (⟨x,x⟩ + ⟨y,y⟩)`` in float64: 0 for equal tensors, NaN if either holds NaN."""
    x, y = x.double(), y.double()
    denom = (x * x).sum() + (y * y).sum()
    return float(1.0 - 2.0 * (x * y).sum() / denom)


def rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖x − ref‖ / ‖ref‖`` (Frobenius, float64); NaN or Inf anywhere in ``x`` gives ``inf``."""
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return float("inf")
    return float((x - ref).norm() / ref.norm().clamp(min=torch.finfo(torch.float64).tiny))


def e4m3_edge_values() -> torch.Tensor:
    """Float32 values in ``[-448, 448]`` where rounding to e4m3 is hardest to get right.

    Every rounding midpoint between neighbouring e4m3 values, one float32 step either side of
    it, and the values where rounding carries into the next binade (like 31.08 -> 32 and
    126.24 -> 128, which the Triton interpreter's cast gets wrong), all with both signs.
    """
    grid = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8_DTYPE).float()
    grid = grid[torch.isfinite(grid) & (grid >= 0)].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    up = torch.full_like(mids, float("inf"))
    near = torch.cat([mids, torch.nextafter(mids, up), torch.nextafter(mids, -up)])
    carries = torch.tensor([31.08, 126.24, 15.6, 7.9, 0.0305, 250.0, 447.9])
    vals = torch.cat([grid, near, carries]).clamp(max=FP8_MAX)
    return torch.cat([vals, -vals])


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with NaN (for float8, its NaN bit pattern 0x7F) so unwritten elements show; returns t."""
    if t.dtype == FP8_DTYPE:
        t.view(torch.uint8).fill_(0x7F)
    else:
        t.fill_(float("nan"))
    return t
