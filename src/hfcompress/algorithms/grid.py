"""Uniform integer grids shared by every algorithm that emits the int_group format.

A grid is ``(scale, zero)`` per row of a ``[R, g]`` block of weights; codes are
``q = clamp(round(w / scale) + zero, 0, maxq)`` and the weight it stands for is
``(q - zero) * scale``. Scales are rounded to fp16 (the stored dtype) *before* codes are
chosen, so what is stored is what was optimised.
"""

from __future__ import annotations

import torch

from ..formats.int_group import SCALE_DTYPE


def _round_scale(scale: torch.Tensor) -> torch.Tensor:
    tiny = torch.finfo(SCALE_DTYPE).tiny
    return scale.clamp(min=tiny).to(SCALE_DTYPE).to(torch.float32)


def _minmax_grid(lo: torch.Tensor, hi: torch.Tensor, bits: int, sym: bool):
    maxq = (1 << bits) - 1
    if sym:
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = _round_scale(2 * amax / maxq)
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        scale = _round_scale((hi - lo) / maxq)
        zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def quantize_to_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes for ``w [R, g]`` (or ``[R]``) on per-row grids ``scale, zero [R]``."""
    if w.dim() == 2:
        scale, zero = scale[:, None], zero[:, None]
    return torch.clamp(torch.round(w / scale) + zero, 0, (1 << bits) - 1)


def fit_grid(w: torch.Tensor, bits: int, sym: bool, mse_clip: bool = False, mask: torch.Tensor | None = None,
             grid_points: int = 40, max_shrink: float = 0.6, norm: float = 2.0):
    """Per-row grid for ``w [R, g]`` (fp32). ``mask [R, g]`` marks real entries (ragged groups).

    Min-max by default. With ``mse_clip``, the range is shrunk by factors ``1 - i/grid_points *
    max_shrink`` and, per row, the factor with the least ``sum |w - w_q|^norm`` is kept.
    """
    w = w.to(torch.float32)
    if mask is None:
        lo, hi = w.min(dim=1).values, w.max(dim=1).values
    else:
        big = torch.finfo(torch.float32).max
        lo = torch.where(mask, w, big).min(dim=1).values
        hi = torch.where(mask, w, -big).max(dim=1).values
    lo, hi = torch.minimum(lo, torch.zeros_like(lo)) if sym else lo, torch.maximum(hi, torch.zeros_like(hi)) if sym else hi
    scale, zero = _minmax_grid(lo, hi, bits, sym)
    if not mse_clip:
        return scale, zero
    best_err = torch.full_like(scale, float("inf"))
    best_scale, best_zero = scale.clone(), zero.clone()
    for i in range(grid_points):
        p = 1.0 - i / grid_points * max_shrink
        s, z = _minmax_grid(lo * p, hi * p, bits, sym)
        q = quantize_to_codes(w, s, z, bits)
        err = ((q - z[:, None]) * s[:, None] - w).abs().pow(norm)
        if mask is not None:
            err = err * mask
        err = err.sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, s, best_scale)
        best_zero = torch.where(better, z, best_zero)
    return best_scale, best_zero
