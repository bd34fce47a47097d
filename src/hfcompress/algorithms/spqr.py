"""SpQR (Dettmers et al., 2023): sparse-quantized representation of a linear layer.

GPTQ's column pass (Frantar et al., 2022) with three changes:

1. small groups (``group_size`` 16 input columns) whose first-level scales are themselves
   quantized to ``stat_bits`` in groups of ``stat_group_size`` output rows (second level, fp16
   scale and zero per stat group); first-level zeros are ``bits``-bit integers. Each row's
   grid is chosen on what is stored: among the scales its quantized statistics can express and
   every integer zero, the pair with the least Hessian-weighted error (min-max only seeds the
   second level);
2. outliers: a weight is an outlier when quantizing it costs more than ``tau`` times the mean
   Hessian-weighted error: (a) before a group's grid is fitted, by the leave-one-out criterion
   (how much the group's error ``sum((w - q(w))^2 / d^2)`` drops when the grid is fitted
   without that weight, ``d = diag(chol(H^-1))``), and the grid is refit with those weights
   replaced by the mean of the others; (b) while a column is quantized, by its own scaled
   error ``((w - q(w)) / d)^2``. Outliers keep their value: the stored delta
   ``fp16(w - q(w))`` is added on top of the dense weight (a CSR matrix);
3. the rounding error of every column (outliers: only the fp16 rounding of their delta) is
   spread over the later columns through ``H^-1`` as in GPTQ.

``tau`` is relative: the threshold is ``tau * mean_k(var_n(W[n, k]) / d_k^2)``. Pure torch; emits
the ``spqr`` format's values (codes in the quantization order, which is the stored order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .gptq import _one_cpu_thread, inverse_hessian_cholesky

STAT_DTYPE = torch.float16


@dataclass
class SpQRResult:
    codes: torch.Tensor          # [N, K] uint8, columns in quantization order
    zero: torch.Tensor           # [N, G] uint8 first-level integer zeros
    scale_code: torch.Tensor     # [N, G] uint8 first-level scales as stat_bits codes
    stat_scale: torch.Tensor     # [G, S] fp16 second-level scale (S = ceil(N / stat_group_size))
    stat_zero: torch.Tensor      # [G, S] fp16 second-level zero
    perm: torch.Tensor           # [K] int32: stored column j is input column perm[j]
    outlier_rows: torch.Tensor   # [nnz] int64, row-major order
    outlier_cols: torch.Tensor   # [nnz] int64 (stored column order)
    outlier_delta: torch.Tensor  # [nnz] fp16: weight = dense + delta


@dataclass
class Hessian:
    """What every layer reading the same input shares: order and ``U = chol(H^-1)`` (upper)."""

    U: torch.Tensor              # [K, K] upper Cholesky factor of (H + damp)^-1, permuted
    perm: torch.Tensor           # [K] long: quantization order
    dead: torch.Tensor           # [K] bool: inputs that are never active (original order)


def prepare_hessian(H: torch.Tensor, damp: float, act_order: bool) -> Hessian:
    """``H [K, K]`` fp32 -> quantization order (descending diag H with act_order) and chol(H^-1)."""
    H = H.detach().to(torch.float32).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    k = H.shape[0]
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(k, device=H.device)
    return Hessian(inverse_hessian_cholesky(H[perm][:, perm], damp), perm, dead)


def minmax_grid(w: torch.Tensor, bits: int):
    """Float asymmetric min-max grid per row of ``w [..., g]`` -> ``scale, zero [...]``."""
    maxq = (1 << bits) - 1
    lo, hi = w.min(dim=-1).values, w.max(dim=-1).values
    scale = ((hi - lo) / maxq).clamp(min=1e-8)
    zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def _fake_quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    q = torch.clamp(torch.round(w / scale[..., None]) + zero[..., None], 0, (1 << bits) - 1)
    return (q - zero[..., None]) * scale[..., None]


def leave_one_out_reduction(w: torch.Tensor, d: torch.Tensor, bits: int) -> torch.Tensor:
    """How much the Hessian-weighted error of each group row drops when weight ``j`` is left out
    of the grid fit (and not quantized). ``w [N, g]``, ``d [g]`` -> ``[N, g]``."""
    g = w.shape[1]
    idx = torch.arange(g, device=w.device)
    loo = idx[1:] - (idx[:, None] >= idx[1:]).to(idx.dtype)             # [g, g-1]: row j = all columns but j
    data = w[:, loo]                                                      # [N, g, g-1]
    s, z = minmax_grid(data, bits)                                        # [N, g]
    err_loo = ((_fake_quant(data, s, z, bits) - data) / d[loo]).square().sum(-1)  # [N, g]
    s0, z0 = minmax_grid(w, bits)                                         # [N]
    err_all = ((_fake_quant(w, s0, z0, bits) - w) / d).square().sum(-1, keepdim=True)  # [N, 1]
    return err_all - err_loo


def quantize_stats(scale: torch.Tensor, stat_bits: int, stat_group_size: int):
    """Second level: first-level scales ``[N]`` -> codes ``[N]``, fp16 scale/zero ``[S]`` per group
    of ``stat_group_size`` rows, and the scale they stand for, ``fp16((c - z) * s)`` (fp32)."""
    n = scale.shape[0]
    pad = -n % stat_group_size
    x = torch.nn.functional.pad(scale, (0, pad), value=float(scale[-1])).view(-1, stat_group_size)  # [S, sg]
    maxq = (1 << stat_bits) - 1
    lo, hi = x.min(dim=1).values, x.max(dim=1).values
    s = ((hi - lo) / maxq).clamp(min=torch.finfo(STAT_DTYPE).tiny).to(STAT_DTYPE).to(torch.float32)  # [S]
    z = -lo / s                                                                                         # [S]
    # z on the fp16 grid of the largest |c - z|: every ``c - z`` is then exact in fp16 too, so
    # fp16 arithmetic (transformers' SpQR kernels) rebuilds the same scales as fp32 does
    span = torch.maximum(z.abs(), (maxq - z).abs()).clamp(min=1)
    ulp = torch.exp2(torch.floor(torch.log2(span)) - 10)
    z = (torch.round(z / ulp) * ulp).to(STAT_DTYPE).to(torch.float32)
    codes = torch.clamp(torch.round(x / s[:, None] + z[:, None]), 0, maxq)                              # [S, sg]
    used = ((codes - z[:, None]) * s[:, None]).to(STAT_DTYPE).to(torch.float32)                         # [S, sg]
    return codes.reshape(-1)[:n], s.to(STAT_DTYPE), z.to(STAT_DTYPE), used.reshape(-1)[:n]


def fit_stored_grid(w: torch.Tensor, d: torch.Tensor, scale_code: torch.Tensor, stat_scale: torch.Tensor,
                    stat_zero: torch.Tensor, bits: int, stat_bits: int, stat_group_size: int, clip: bool = True):
    """The grid each row of a group actually stores, chosen on that storage: the scale codes the
    row's second-level statistics allow (``fp16((c - sz) * ss)``; all of them up to 16, else the
    rounded min-max code +- 4) times every integer zero ``z``: the pair with the least
    Hessian-weighted error ``sum_j ((w_j - q(w_j)) / d_j)^2``. (Min-max fits the float scale and
    zero before the scale is rounded to ``stat_bits``: the rounded scale no longer matches the
    zero, and 3-bit scales are coarse.) ``w [N, g]``, ``d [g]``, ``scale_code [N]`` (min-max's),
    ``stat_scale / stat_zero [S]`` -> scale codes, zeros, scales ``[N]``."""
    n = w.shape[0]
    maxq, maxc = (1 << bits) - 1, (1 << stat_bits) - 1
    which = torch.arange(n, device=w.device) // stat_group_size                          # [N] stat group of a row
    ss, sz = stat_scale.to(torch.float32)[which], stat_zero.to(torch.float32)[which]     # [N]
    if maxc < 16:
        codes = torch.arange(maxc + 1, device=w.device, dtype=torch.float32).expand(n, -1)   # [N, C]
    else:
        codes = (scale_code[:, None] + torch.arange(-4, 5, device=w.device)).clamp(0, maxc).to(torch.float32)
    cand = ((codes - sz[:, None]) * ss[:, None]).to(STAT_DTYPE).to(torch.float32)        # [N, C] candidate scales
    zs = torch.arange(maxq + 1, device=w.device, dtype=torch.float32)[:, None]           # [Z, 1]
    err = []
    for c in range(cand.shape[1]):                                                       # [N, Z] per candidate
        s = cand[:, c, None, None]                                                       # [N, 1, 1]
        safe = torch.where(s > 0, s, torch.ones_like(s))
        r = torch.round(w[:, None, :] / safe) + zs                                       # [N, Z, g]
        q = torch.clamp(r, 0, maxq)
        e = (((q - zs) * s - w[:, None, :]) / d).square().sum(-1)                        # [N, Z]
        ok = s[:, :, 0] > 0
        if not clip:                                                                     # every weight on the grid
            ok = ok & ((r >= 0) & (r <= maxq)).all(-1)
        err.append(torch.where(ok, e, torch.full_like(e, float("inf"))))
    err = torch.stack(err, 1).reshape(n, -1)                                             # [N, C x Z]
    if not clip:  # a row no candidate covers (its stored scales are all too small): the least error
        none = torch.isinf(err).all(1)
        if bool(none.any()):
            return fit_stored_grid(w, d, scale_code, stat_scale, stat_zero, bits, stat_bits, stat_group_size) \
                if bool(none.all()) else _merge_rows(none, fit_stored_grid(w, d, scale_code, stat_scale, stat_zero,
                                                                           bits, stat_bits, stat_group_size),
                                                     err, codes, cand, maxq)
    best = err.argmin(1)                                                                 # [N] over C x Z
    c, z = best // (maxq + 1), best % (maxq + 1)
    return codes.gather(1, c[:, None])[:, 0], z.to(torch.float32), cand.gather(1, c[:, None])[:, 0]


def _merge_rows(none, fallback, err, codes, cand, maxq):
    best = err.argmin(1)
    c, z = best // (maxq + 1), best % (maxq + 1)
    out = codes.gather(1, c[:, None])[:, 0], z.to(torch.float32), cand.gather(1, c[:, None])[:, 0]
    return tuple(torch.where(none, f, o) for f, o in zip(fallback, out))


@torch.no_grad()
def spqr(weight: torch.Tensor, hessian: Hessian, bits: int = 3, group_size: int = 16, stat_bits: int = 3,
         stat_group_size: int = 16, outlier_threshold: float = float("inf"), block_size: int = 128,
         grid_weighting: str = "hessian", grid_clip: bool = True) -> SpQRResult:
    """Quantize ``weight [N, K]`` (``K % group_size == 0``) given the shared :class:`Hessian`.

    ``grid_weighting``: ``"hessian"`` (default) weights each column's error by ``1 / d^2`` in the
    grid fits (leave-one-out and stored grid), ``"uniform"`` weights all alike; ``grid_clip=False``
    keeps only grids that hold every (non-outlier) weight of the group row. Both alternatives were
    measured worse on held-out text (benchmarks/spqr_layer_error.py); they stay for that comparison."""
    if grid_weighting not in ("hessian", "uniform"):
        raise ValueError(f"grid_weighting={grid_weighting!r}: choose 'hessian' or 'uniform'")
    W = weight.detach().to(torch.float32).clone()                 # [N, K]
    W[:, hessian.dead] = 0.0
    W = W[:, hessian.perm]                                        # quantization order
    U = hessian.U.to(W.device)                                    # [K, K]
    n, k = W.shape
    g, maxq = group_size, (1 << bits) - 1
    d = torch.diag(U)                                             # [K]
    dg = d if grid_weighting == "hessian" else torch.ones_like(d)  # [K] weights of the grid fits
    tau = outlier_threshold * float((W.var(dim=0) / d.square()).mean()) if outlier_threshold != float("inf") \
        else float("inf")
    tau_g = tau if grid_weighting == "hessian" else outlier_threshold * float(W.var(dim=0).mean())

    n_groups = k // g
    codes = torch.zeros(n, k, dtype=torch.uint8, device=W.device)
    zeros = torch.zeros(n, n_groups, device=W.device)
    scale_codes = torch.zeros(n, n_groups, device=W.device)
    n_stat = -(-n // stat_group_size)
    stat_scale = torch.zeros(n_groups, n_stat, dtype=STAT_DTYPE, device=W.device)
    stat_zero = torch.zeros(n_groups, n_stat, dtype=STAT_DTYPE, device=W.device)
    out_mask = torch.zeros(n, k, dtype=torch.bool, device=W.device)
    out_delta = torch.zeros(n, k, dtype=STAT_DTYPE, device=W.device)
    B = max(g, block_size // g * g)                               # blocks hold whole groups

    with _one_cpu_thread(W.device):
        for i1 in range(0, k, B):
            i2 = min(i1 + B, k)
            W1 = W[:, i1:i2].clone()                              # [N, b] updated in place
            E1 = torch.zeros_like(W1)                             # [N, b] scaled errors
            U1 = U[i1:i2, i1:i2]                                  # [b, b]
            for i in range(i2 - i1):
                col = i1 + i
                if col % g == 0:                                  # a new group: fit its grid
                    grp = col // g
                    gw = W1[:, i:i + g]                           # [N, g] current values
                    if tau != float("inf"):                       # fit without likely outliers
                        likely = leave_one_out_reduction(gw, dg[col:col + g], bits) > tau_g   # [N, g]
                        keep = (~likely).to(gw.dtype)
                        mean = (gw * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp_min(1)
                        gw = torch.where(likely, mean, gw)
                    s1, _ = minmax_grid(gw, bits)                 # [N] first level (float)
                    sc, ss, sz, _ = quantize_stats(s1, stat_bits, stat_group_size)  # second level [S]
                    sc, z1, scale = fit_stored_grid(gw, dg[col:col + g], sc, ss, sz, bits, stat_bits, stat_group_size,
                                                    grid_clip)
                    zeros[:, grp], scale_codes[:, grp] = z1, sc
                    stat_scale[grp], stat_zero[grp] = ss, sz
                    zero = z1
                    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
                w = W1[:, i]                                      # [N]
                q = torch.clamp(torch.round(w / safe) + zero, 0, maxq)   # [N] codes
                deq = (q - zero) * scale                          # [N] dense weight (fp32, as stored)
                err = (w - deq) / U1[i, i]
                if tau != float("inf"):
                    is_out = err.square() > tau                   # [N] outliers of this column
                    delta = torch.where(is_out, w - deq, torch.zeros_like(w)).to(STAT_DTYPE)
                    deq = deq + delta.to(torch.float32)
                    err = (w - deq) / U1[i, i]
                    out_mask[:, col], out_delta[:, col] = is_out, delta
                codes[:, col] = q.to(torch.uint8)
                W1[:, i:].addr_(err, U1[i, i:], alpha=-1)         # spread over the block's rest
                E1[:, i] = err
            W[:, i2:].addmm_(E1, U[i1:i2, i2:], alpha=-1)         # lazy update of later columns

    rows, cols = out_mask.nonzero(as_tuple=True)                  # row-major (CSR order)
    return SpQRResult(codes, zeros.to(torch.uint8), scale_codes.to(torch.uint8), stat_scale, stat_zero,
                      hessian.perm.to(torch.int32),
                      rows, cols, out_delta[rows, cols])
