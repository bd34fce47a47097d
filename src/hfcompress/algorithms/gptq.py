"""GPTQ (Frantar et al., 2022): one-shot second-order quantization of a linear layer.

Minimises ``||W X - Q X||^2`` column by column: each column is rounded onto its group's grid
and the rounding error is spread over the not-yet-quantized columns through the inverse
Hessian ``H^-1`` (``H = 2 X X^T``), using its upper Cholesky factor (Algorithm 1 of the paper).
Columns are processed in blocks of ``block_size`` with lazy updates of the rest of the matrix.
Pure torch; emits the int_group format (codes [N, K], scale [N, G], zero [N, G], g_idx [K]).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from ..formats.int_group import IntGroupSpec
from .grid import fit_grid, hqq_float_grid, search_float_grid, search_grid


#: columns of ``U = R^-1`` solved per call (:func:`inverse_columns`); fixed, so the chunks a distributed
#: run hands out are solved exactly as a single process solves them (bit for bit the same ``U``)
INVERSE_CHUNK = 64


def inverse_hessian_cholesky(H: torch.Tensor, damp: float, solve_inverse=None, flipped: bool = False) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + λI)^-1`` (``U^T U = (H + λI)^-1``), ``λ = damp * mean(diag H)``.
    ``H [K, K]`` fp32, symmetric (every ``X^T X`` the library builds is, exactly): LAPACK reads one
    triangle of it, its lower one.

    One Cholesky factorization: that of ``H`` with its rows and columns reversed (``J H J = L L^T``)
    gives ``H = R R^T`` with ``R = J L J`` upper triangular, so ``(H + λI)^-1 = R^-T R^-1`` and
    ``U = R^-1`` (upper, positive diagonal: the unique Cholesky factor). No inverse is formed and
    factored again (GPTQ's reference: Cholesky, ``cholesky_inverse``, Cholesky: ~2.5x the time on
    CPU, and less accurate). Two ``K x K`` buffers in all: the reversed copy of ``H``, factored in
    place into ``L`` (``R`` is never formed: each chunk of :func:`inverse_columns` reads its corner of
    ``L``), and ``U``; one with ``flipped``: ``H`` is then given reversed (``J H J``, as :func:`gptq`
    permutes it: straight into that order) and is factored in place. ``solve_inverse(L)`` -> ``R^-1``
    may solve its column chunks elsewhere (a distributed run splits them over ranks:
    :func:`inverse_columns`)."""
    if flipped:
        lam = damp * torch.mean(torch.diag(H).flip(0))              # diag(H) in H's own order, as below
        Hf = H
    else:
        lam = damp * torch.mean(torch.diag(H))
        Hf = H.flip(0, 1)                                           # a copy: H itself is left as it is
    Hf.diagonal().add_(lam)                                         # J (H + λI) J: symmetric, so Hf.mT is the
    L = Hf.mT                                                       # same matrix, column-major as LAPACK wants
    torch.linalg.cholesky(L, out=L)                                 # J (H + λI) J = L L^T, in place
    return (solve_inverse or upper_inverse)(L)  # [K, K] upper


def inverse_chunks(k: int) -> list[tuple[int, int]]:
    """Column ranges of ``R^-1 [k, k]`` solved one call each (:data:`INVERSE_CHUNK` wide)."""
    return [(a, min(a + INVERSE_CHUNK, k)) for a in range(0, k, INVERSE_CHUNK)]


def inverse_columns(L: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Columns ``a:b`` of ``R^-1`` (``R = J L J [K, K]`` upper triangular, ``L`` the lower Cholesky
    factor of :func:`inverse_hessian_cholesky`) down to row ``b``: ``[b, b - a]`` (the rows below
    are 0). Column ``j`` solves ``R x = e_j``, whose entries below ``j`` are 0, so the chunk needs
    only ``R[:b, :b]`` (``b^2 (b - a)`` multiply-adds, ``K^3 / 3`` over every chunk: a third of a
    full triangular solve): ``L``'s last ``b`` rows and columns reversed, copied column-major (the
    layout the triangular solve reads without a copy of its own)."""
    k = L.shape[0]
    Rb = L.mT[k - b:, k - b:].flip(0, 1).mT                       # R[:b, :b], column-major [b, b]
    eye = torch.zeros(b, b - a, dtype=L.dtype, device=L.device)   # columns a:b of the identity [b, b]
    eye[a:].fill_diagonal_(1.0)
    return torch.linalg.solve_triangular(Rb, eye, upper=True)


def upper_inverse(L: torch.Tensor, chunks: dict | None = None) -> torch.Tensor:
    """``R^-1 [K, K]`` of ``R = J L J`` (upper triangular), chunk by chunk (:func:`inverse_chunks`);
    ``chunks`` ``{(a, b): inverse_columns(L, a, b)}`` already solved (elsewhere) are used as they are."""
    k = L.shape[0]
    U = torch.zeros_like(L)
    for a, b in inverse_chunks(k):
        U[:b, a:b] = chunks[(a, b)] if chunks is not None else inverse_columns(L, a, b)
    return U


@torch.no_grad()
def gptq(weight: torch.Tensor, H: torch.Tensor, spec: IntGroupSpec, damp: float = 0.01, static_groups: bool = False,
         mse_clip: bool = False, block_size: int = 32, solve_inverse=None):
    """Quantize ``weight [N, K]`` with Hessian ``H [K, K]`` (fp32, e.g. ``2 X X^T / n``).

    ``spec.act_order`` quantizes columns by descending ``diag(H)`` and returns ``g_idx [K]``
    (group of each input column); with ``static_groups`` the groups stay the natural ones
    (``k // group_size``, fitted before reordering) and ``g_idx`` is None.
    Returns ``codes [N, K]`` (uint8), ``scale [N, G]`` (fp32), ``zero [N, G]`` (uint8; fp32 with
    ``spec.zero_point == "float"``; None if symmetric),
    ``g_idx [K]`` (int32 or None). ``solve_inverse``: see :func:`inverse_hessian_cholesky`.
    """
    W = weight.detach().to(torch.float32, copy=True)  # [N, K]
    H = H.detach().to(device=W.device, dtype=torch.float32)  # [K, K] (not changed: its permuted copy is)
    n, k = W.shape
    g = spec.effective_group_size(k)
    n_groups = spec.n_groups(k)
    act_order = spec.act_order or static_groups

    # dead inputs (never active): pin their Hessian diagonal (in the permuted copy below), their
    # weights cannot matter
    h_diag = H.diagonal().clone()
    dead = h_diag == 0
    h_diag[dead] = 1.0
    W[:, dead] = 0.0

    # static groups / per-channel: grids fitted on the original weight, natural groups
    static = None
    scales = torch.zeros(n, n_groups, device=W.device)
    zeros = torch.zeros(n, n_groups, device=W.device)
    if static_groups or spec.group_size == -1:
        # (weighted by diag(H): no column is quantized yet, so no conditional inverse applies)
        static = [group_grid(W[:, j * g:(j + 1) * g], h_diag[j * g:(j + 1) * g].rsqrt(), spec, mse_clip)
                  for j in range(n_groups)]
        for j, (s_j, z_j) in enumerate(static):
            scales[:, j], zeros[:, j] = s_j, z_j

    # act-order: quantize the columns with the largest Hessian diagonal first
    perm = torch.argsort(h_diag, descending=True) if act_order else torch.arange(k, device=W.device)
    W = W.index_select(1, perm)
    # H in the order the columns are quantized, reversed (J H[perm][:, perm] J: what the factor factors,
    # in place), permuted straight into that order (index_select twice: 3-7x faster than H[rev][:, rev])
    rev = perm.flip(0)
    Hf = H.index_select(0, rev).index_select(1, rev)
    Hf.diagonal()[dead[rev]] = 1.0
    U = inverse_hessian_cholesky(Hf, damp, solve_inverse, flipped=True)  # [K, K] upper Cholesky of H^-1
    del Hf  # (factored in place)

    codes = torch.zeros(n, k, dtype=torch.uint8, device=W.device)
    col_group = torch.zeros(k, dtype=torch.long, device=W.device)  # group of permuted column i
    # blocks never straddle a group start: a group starts at a block start, where every later
    # column already holds all lazy updates, so its grid is fitted on fresh values
    B = block_size if static is not None else math.gcd(g, block_size)

    with _one_cpu_thread(W.device):
        _column_loop_(W, U, codes, scales, zeros, col_group, perm, static, spec, g, B, mse_clip)

    inv = torch.argsort(perm)
    codes = codes.index_select(1, inv)
    g_idx = col_group[inv].to(torch.int32) if spec.act_order else None
    zero_out = None if spec.sym else (zeros if spec.zero_point == "float" else zeros.to(torch.uint8))
    return codes, scales, zero_out, g_idx


def _column_loop_(W, U, codes, scales, zeros, col_group, perm, static, spec, g, B, mse_clip) -> None:
    """Algorithm 1's loop over column blocks of ``B`` (W [N, K] permuted, U [K, K] upper Cholesky
    of H^-1); fills ``codes``, ``scales``, ``zeros``, ``col_group`` in place.

    A column is seven small operations whatever ``N`` (nine with float zeros), each on contiguous
    memory: the block is worked on transposed (``W1t [b, N]``: a column of W is a row there), its
    codes are rounded in place in ``Q1t`` and its errors computed in place in ``E1t`` (both
    allocated once); every column's views come from one ``unbind`` per block. The arithmetic is
    the readable one's (``q = clamp(round(w / scale) + zero)``, ``err = (w - (q - zero) * scale) /
    U[i, i]``, ``W[:, j] -= err * U[i, j]`` for the block's later columns ``j``), in the same order.
    With integer zeros the loop keeps the level ``q - zero = clamp(round(w / scale), -zero, maxq -
    zero)`` (small integers, exact in fp32: the same level, so the same error) and adds the zeros
    back once per block."""
    n, k = W.shape
    maxq = (1 << spec.bits) - 1
    float_zero = spec.zero_point == "float"
    if static is not None:  # natural group of each (permuted) column
        groups = [0] * k if spec.group_size == -1 else [p // g for p in perm.tolist()]
        col_group.copy_(torch.tensor(groups))
        bounds = [(-z, maxq - z) for _, z in static]  # the levels each grid allows
    else:  # a new group starts every g columns (blocks divide g): its grid is fitted there
        col_group.copy_(torch.arange(k, device=W.device) // g)
    Qt = torch.empty(min(B, k), n, dtype=W.dtype, device=W.device)   # [B, N] codes (float) of a block
    Et = torch.empty_like(Qt)                                         # [B, N] scaled errors of a block
    for i1 in range(0, k, B):
        i2 = min(i1 + B, k)
        b = i2 - i1
        W1t = W[:, i1:i2].t().contiguous()    # [b, N] columns of this block (as rows), updated in place
        Q1t, E1t = Qt[:b], Et[:b]
        U1 = U[i1:i2, i1:i2]                  # [b, b]
        block_zeros = []                      # static groups: the zero of each column (for the codes)
        cols = zip(W1t.unbind(0), Q1t.unbind(0), E1t.unbind(0), U1.diagonal().unbind(0))
        for i, (w, q, err, u_ii) in enumerate(cols):                # w, q, err [N]; u_ii = U1[i, i]
            col = i1 + i
            if static is not None:
                scale, zero = static[groups[col]]
                lo, hi = bounds[groups[col]]
                block_zeros.append(zero)
            elif col % g == 0:                # a new group starts (i == 0): fit its grid on current values
                grp = col // g
                scale, zero = group_grid(W[:, col:col + g], U.diagonal()[col:col + g], spec, mse_clip)
                scales[:, grp], zeros[:, grp] = scale, zero
                lo, hi = -zero, maxq - zero
            if float_zero:                                           # q = clamp(round(w / scale + zero))
                torch.div(w, scale, out=q).add_(zero).round_().clamp_(0, maxq)
                torch.sub(q, zero, out=err).mul_(scale)              # err = (w - (q - zero) * scale) / U1[i, i]
            else:                                                    # q - zero = clamp(round(w / scale), -zero, maxq - zero)
                torch.div(w, scale, out=q).round_().clamp_(lo, hi)
                torch.mul(q, scale, out=err)                         # err = (w - (q - zero) * scale) / U1[i, i]
            torch.sub(w, err, out=err).div_(u_ii)                    # the rounding error, scaled
            W1t[i:].addr_(U1[i, i:], err, alpha=-1)                  # spread it over the block's rest
        if not float_zero:                                           # codes = levels + zero
            Q1t.add_(torch.stack(block_zeros) if static is not None else zero)
        codes[:, i1:i2] = Q1t.t()
        W[:, i2:].addmm_(E1t.t().contiguous(), U[i1:i2, i2:], alpha=-1)   # lazy batch update of later columns


def group_grid(Wg: torch.Tensor, u_diag: torch.Tensor, spec: IntGroupSpec, mse_clip: bool):
    """Grid of one group ``Wg [N, g]`` (current, error-updated values). With ``mse_clip`` (asymmetric),
    the searched grid minimising ``sum_j (w_j - w_q,j)^2 / [H^-1]_jj``: quantizing column j with error
    ``d`` raises GPTQ's objective by ``d^2 / [H^-1]_jj`` (``[H^-1]_jj = u_diag[j]^2``, the diagonal
    of the Cholesky factor of the inverse Hessian over the columns not yet quantized).

    Float zeros (``spec.zero_point == "float"``): without ``mse_clip`` HQQ's half-quadratic zero
    (as RTN's); with it, the least squares of the same weighted error over float-zero grids
    (:func:`search_float_grid`), the integer-zero searched grid and HQQ's being candidates, so no
    group's weighted error is above the integer-zero grid's."""
    if spec.zero_point == "float":
        if not mse_clip:
            return hqq_float_grid(Wg, spec.bits)
        imp = (1.0 / u_diag.square())[None, :]
        return search_float_grid(Wg, spec.bits, importance=imp, start="hqq",
                                 extra=[search_grid(Wg, spec.bits, importance=imp)])
    if not mse_clip or spec.sym:
        return fit_grid(Wg, spec.bits, spec.sym, mse_clip=mse_clip)
    return search_grid(Wg, spec.bits, importance=(1.0 / u_diag.square())[None, :])


@contextmanager
def _one_cpu_thread(device: torch.device):
    """The column loop is thousands of tiny ops: on CPU, intra-op threads only add barrier
    waits (badly so on a busy machine), so it runs on one thread; the setting is restored."""
    if device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
