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

    Min-max by default. With ``mse_clip``: asymmetric grids come from :func:`search_grid` (least
    squared error, integer zeros); symmetric ones shrink the range by factors ``1 - i/grid_points *
    max_shrink`` and keep, per row, the factor with the least ``sum |w - w_q|^norm``.
    """
    if mse_clip and not sym:
        return search_grid(w, bits, mask=mask)
    w = w.to(torch.float32)
    if mask is None:
        lo, hi = w.amin(dim=1), w.amax(dim=1)
    else:
        big = torch.finfo(torch.float32).max
        lo = torch.where(mask, w, big).amin(dim=1)
        hi = torch.where(mask, w, -big).amax(dim=1)
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


def _row_range(w, mask):
    """Per row of ``w [R, g]``, the least and largest entry where ``mask [R, g]`` (all if None)."""
    if mask is None:  # (amin / amax: the same values, ~10x faster than min / max, which also find indices)
        return w.amin(dim=1), w.amax(dim=1)
    big = torch.finfo(torch.float32).max
    return torch.where(mask, w, big).amin(dim=1), torch.where(mask, w, -big).amax(dim=1)


def _entry_weights(w, importance, mask):
    """Weight ``d [R, g]`` of each entry's error: ``importance`` (``[R, g]`` or ``[g]``) times ``mask``;
    None when both are None (all ones)."""
    d = None if importance is None else importance.to(torch.float32).expand_as(w)
    if mask is not None:
        d = mask.to(torch.float32) if d is None else d * mask
    return d


def _keep_better(e, s, z, best_e, best_s, best_z):
    """Per row, the candidate grid ``(s, z)`` where its error ``e`` is lower than the best so far."""
    better = e < best_e
    return torch.where(better, e, best_e), torch.where(better, s, best_s), torch.where(better, z, best_z)


def _grid_error(w, scale, zero, bits, importance, p):
    """``sum_j d_j |w_j - w_q,j|^p`` per row of ``w [R, g]`` on grids ``scale, zero [R]`` (``d``:
    ``importance [R, g]``, or None for ones). In place on one temporary: this runs per candidate."""
    s, z = scale[:, None], zero[:, None]
    r = torch.div(w, s).round_().add_(z).clamp_(0, (1 << bits) - 1).sub_(z).mul_(s).sub_(w)
    r = r.square_() if p == 2.0 else r.abs_().pow_(p)
    if importance is not None:
        r.mul_(importance)
    return r.sum(dim=-1)


def search_grid(w: torch.Tensor, bits: int, importance: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                p: float = 2.0, shrink: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85), refine: int = 2):
    """Asymmetric grid for ``w [R, g]`` (fp32) with an integer zero, minimising
    ``sum_j d_j |w_j - (q_j - z) s|^p`` per row (``d = importance [R, g]`` or ``[g]``, ones if None).

    1. candidates: the min-max grid, and for each range ``r * [lo, hi]`` (``r`` in ``shrink``) the
       two integer zeros next to ``-lo / s`` with the least scale whose grid covers the range;
       each row keeps its best;
    2. ``refine`` alternating steps (Lloyd on a uniform grid, half-quadratic for ``p < 2``): with
       the codes fixed, the (``|r|^(p-2)``-reweighted) least-squares scale, then the best integer
       zero; a row keeps a step only if its error drops.
    Scales are rounded to the stored fp16 before every evaluation. Returns ``scale, zero [R]``.
    """
    w = w.to(torch.float32)
    maxq = (1 << bits) - 1
    d = _entry_weights(w, importance, mask)
    lo, hi = _row_range(w, mask)
    best_s, best_z = _minmax_grid(lo, hi, bits, sym=False)  # min-max (fit_grid's) is the first candidate
    best_e = _grid_error(w, best_s, best_z, bits, d, p)
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)  # an integer zero in [0, maxq] puts 0 on every grid
    # [C, R] candidates: shrunk ranges, both integer zeros around the continuous one
    r = torch.tensor(shrink, dtype=torch.float32, device=w.device)[:, None]      # [S, 1]
    lo_r, hi_r = lo[None] * r, hi[None] * r                                        # [S, R]
    z_real = -lo_r / ((hi_r - lo_r) / maxq).clamp(min=torch.finfo(torch.float32).tiny)
    z = torch.cat([z_real.floor(), z_real.ceil()]).clamp(0, maxq)                  # [C, R]
    lo_r, hi_r = torch.cat([lo_r, lo_r]), torch.cat([hi_r, hi_r])
    s = torch.maximum(torch.where(z > 0, -lo_r / z.clamp(min=1), 0.0),
                      torch.where(z < maxq, hi_r / (maxq - z).clamp(min=1), 0.0))
    s = _round_scale(s)
    for c in range(z.shape[0]):  # one candidate at a time: [R, g] temporaries only
        e = _grid_error(w, s[c], z[c], bits, d, p)
        best_e, best_s, best_z = _keep_better(e, s[c], z[c], best_e, best_s, best_z)
    for _ in range(refine):
        q = quantize_to_codes(w, best_s, best_z, bits)
        c = q - best_z[:, None]                                                    # [R, g] integer levels
        dd = torch.ones_like(w) if d is None else d
        if p != 2.0:  # half-quadratic / IRLS weight of an L_p residual
            res = (c * best_s[:, None] - w).abs().clamp(min=1e-3 * best_s[:, None])
            dd = dd * res.pow(p - 2.0)
        s_new = _round_scale((dd * w * c).sum(1) / (dd * c * c).sum(1).clamp(min=1e-30))
        z_new = torch.round((dd * (q - w / s_new[:, None])).sum(1) / dd.sum(1).clamp(min=1e-30)).clamp(0, maxq)
        e = _grid_error(w, s_new, z_new, bits, d, p)
        best_e, best_s, best_z = _keep_better(e, s_new, z_new, best_e, best_s, best_z)
    return best_s, best_z


# --- float zero-points: ``q = clamp(round(w / s + z), 0, maxq)``, weight ``(q - z) * s``, ``z`` any fp16 value


def zero_flush(bits: int) -> float:
    """|z| below this (code units) is stored as 0 (a shift under 2**(bits-14) of a step): then
    ``q - z`` is exact in fp32 for every code, so every kernel computes the reference bit for bit."""
    return 2.0 ** (bits - 14)


def round_zero(zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Float zeros as stored (fp16), tiny ones flushed to 0 (:func:`zero_flush`)."""
    return torch.where(zero.abs() < zero_flush(bits), 0.0, zero).to(SCALE_DTYPE).to(torch.float32)


def quantize_to_codes_float_zero(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes for ``w [R, g]`` (or ``[R]``) on per-row grids with float zeros ``scale, zero [R]``."""
    if w.dim() == 2:
        scale, zero = scale[:, None], zero[:, None]
    return torch.clamp(torch.round(w / scale + zero), 0, (1 << bits) - 1)


def _float_grid_error(w, scale, zero, bits, importance, p):
    s, z = scale[:, None], zero[:, None]
    r = torch.div(w, s).add_(z).round_().clamp_(0, (1 << bits) - 1).sub_(z).mul_(s).sub_(w)
    r = r.square_() if p == 2.0 else r.abs_().pow_(p)
    if importance is not None:
        r.mul_(importance)
    return r.sum(dim=-1)


def minmax_float_grid(w: torch.Tensor, bits: int, mask: torch.Tensor | None = None):
    """Min-max grid with a float zero: ``lo`` and ``hi`` of each row of ``w [R, g]`` are (up to the
    fp16 rounding of the stored scale and zero) the ends of the grid."""
    lo, hi = _row_range(w.to(torch.float32), mask)
    scale = _round_scale((hi - lo) / ((1 << bits) - 1))
    return scale, round_zero(-lo / scale, bits)


def hqq_float_grid(w: torch.Tensor, bits: int, mask: torch.Tensor | None = None, p: float = 0.7,
                   beta: float = 10.0, iters: int = 20, round_start: bool = True, stop: str = "row",
                   importance: torch.Tensor | None = None):
    """HQQ's data-free grid (Badri & Shaji 2023, the half-quadratic solver of hqq 0.2's default):
    the min-max scale, and the float zero minimising ``sum_j |w_j - (q_j - z) s|^p`` by
    alternating the codes, a generalised soft-threshold of the error and the zero that absorbs
    the rest. ``round_start``: start from min-max's integer zero (hqq's 4-bit default).
    ``stop="row"``: a row keeps its best iterate; ``"tensor"``: as hqq, every row stops at the
    first iterate whose mean absolute error over all of ``w`` rises. ``importance [R, g]`` (or
    ``[g]``) weights each entry's error and its share of the zero update.

    Each step computes the codes and residual of its zero once: they are the next step's start
    and, in absolute value, the error :func:`_float_grid_error` computes (``|fl(x - w)| = |fl(w - x)|``),
    so the result is that of evaluating them separately, bit for bit. The scale never changes:
    ``w / s`` is divided once. A zero that maps to itself ends the loop (every later step would
    repeat it)."""
    w = w.to(torch.float32)
    maxq = (1 << bits) - 1
    scale, zero = minmax_float_grid(w, bits, mask)
    if round_start:
        zero = round_zero(zero.round(), bits)
    d = _entry_weights(w, importance, mask)
    d_sum = None if d is None else d.sum(1)
    s = scale[:, None]
    ws = w / s

    def codes_residual(z):  # codes q, residual r = w - (q - z) s, |r| of zero z [R]
        q = torch.add(ws, z[:, None]).round_().clamp_(0, maxq)
        r = torch.sub(q, z[:, None]).mul_(s)
        torch.sub(w, r, out=r)
        return q, r, r.abs()

    def error(a):  # sum_j d_j |r_j|^p per row
        e = a.pow(p)
        if d is not None:
            e.mul_(d)
        return e.sum(dim=-1)

    q, r, a = codes_residual(zero)
    best_z = zero.clone()
    best_e = error(a)
    if stop == "tensor":
        tensor_e = float("inf")
    for _ in range(iters):
        e = (a - a.pow(p - 1) / beta).clamp_(min=0)
        e = torch.copysign(e, r, out=e)                                  # shrink_lp of the residual
        t = torch.sub(w, e, out=e).div_(s)
        t = torch.sub(q, t, out=t)                                       # q - (w - e) / s
        new = t.mean(1) if d is None else t.mul_(d).sum(1) / d_sum
        new = round_zero(new, bits)
        if stop == "tensor":  # hqq: the error of the codes this step chose, mean |r| over the tensor
            e_t = float(a.mean()) if d is None else float((a * d).sum() / d.sum())
            if e_t >= tensor_e:
                break
            tensor_e, best_z = e_t, new
        fixed = torch.equal(new, zero)
        zero = new
        if fixed:  # every later step repeats this one: nothing can change
            break
        q, r, a = codes_residual(zero)
        if stop == "row":
            err = error(a)
            better = err < best_e
            best_e = torch.where(better, err, best_e)
            best_z = torch.where(better, zero, best_z)
    return scale, best_z


def search_float_grid(w: torch.Tensor, bits: int, importance: torch.Tensor | None = None,
                      mask: torch.Tensor | None = None, p: float = 2.0,
                      shrink: tuple[float, ...] = (1.0,), refine: int = 4, start: str = "minmax",
                      extra: list | None = None):
    """Asymmetric grid for ``w [R, g]`` with a float zero minimising ``sum_j d_j |w_j - (q_j - z) s|^p``:
    candidates (the min-max grid of ranges shrunk about their middle by ``shrink``; ``start="hqq"``
    adds :func:`hqq_float_grid`), each row keeps its best; then ``refine`` Lloyd steps on the affine
    grid (codes fixed: the weighted least-squares scale and offset, ``|r|^(p-2)``-reweighted for
    ``p < 2``); a row keeps a step only if its error drops. ``extra``: more ``(scale, zero)``
    candidates (e.g. an integer-zero grid, which is one of these grids too)."""
    w = w.to(torch.float32)
    d = _entry_weights(w, importance, mask)
    lo, hi = _row_range(w, mask)
    maxq = (1 << bits) - 1
    best_s, best_z = minmax_float_grid(w, bits, mask)
    best_e = _float_grid_error(w, best_s, best_z, bits, d, p)
    cands = []
    mid, half = (hi + lo) / 2, (hi - lo) / 2
    for r in shrink:
        if r != 1.0:
            s = _round_scale(2 * half * r / maxq)
            cands.append((s, round_zero(-(mid - half * r) / s, bits)))
    if start == "hqq":
        cands.append(hqq_float_grid(w, bits, mask, importance=importance))
    cands += list(extra or [])
    for s, z in cands:
        e = _float_grid_error(w, s, z, bits, d, p)
        best_e, best_s, best_z = _keep_better(e, s, z, best_e, best_s, best_z)
    dd0 = torch.ones_like(w) if d is None else d
    for _ in range(refine):
        c = quantize_to_codes_float_zero(w, best_s, best_z, bits)                 # [R, g] codes
        dd = dd0
        if p != 2.0:
            res = ((c - best_z[:, None]) * best_s[:, None] - w).abs().clamp(min=1e-3 * best_s[:, None])
            dd = dd0 * res.pow(p - 2.0)
        # weighted least squares of w ~ s c + m over each row
        s0, s1, s2 = dd.sum(1), (dd * c).sum(1), (dd * c * c).sum(1)
        t0, t1 = (dd * w).sum(1), (dd * w * c).sum(1)
        det = s0 * s2 - s1 * s1
        ok = det > 1e-12 * s0 * s2
        s_new = torch.where(ok, (s0 * t1 - s1 * t0) / torch.where(ok, det, 1.0), best_s)
        s_new = _round_scale(torch.where(s_new > 0, s_new, best_s))
        m = (t0 - s_new * s1) / s0.clamp(min=1e-30)                               # offset for the rounded scale
        z_new = round_zero(-m / s_new, bits)
        e = _float_grid_error(w, s_new, z_new, bits, d, p)
        best_e, best_s, best_z = _keep_better(e, s_new, z_new, best_e, best_s, best_z)
    return best_s, best_z


def fit_float_grid(w: torch.Tensor, bits: int, mse_clip: bool = False, mask: torch.Tensor | None = None):
    """RTN's grid with float zeros (``zero_point="float"``) for ``w [R, g]``: HQQ's half-quadratic
    zero started from min-max's integer zero (:func:`hqq_float_grid`; measured better in
    perplexity than a float min-max zero on SmolLM2, benchmarks/README.md); with ``mse_clip``,
    the least-squares Lloyd search started from it (:func:`search_float_grid`)."""
    if mse_clip:
        return search_float_grid(w, bits, mask=mask, start="hqq")
    return hqq_float_grid(w, bits, mask)
