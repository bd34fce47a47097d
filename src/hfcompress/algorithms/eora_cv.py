"""Cross-validated shrinkage for EoRA (an hfcompress addition; not in the EoRA paper).

EoRA (:mod:`hfcompress.algorithms.eora`) solves a layer on its calibration ``XᵀX``, shrunk toward
its diagonal by ``t`` (:func:`~hfcompress.algorithms.eora.shrink_to_diagonal`). Which ``t``
generalises is a property of the layer and of how much data there is, so it is chosen per layer
on held-out calibration tokens:

1. The calibration windows are split into ``F`` folds; ``C_f`` is ``XᵀX`` of fold ``f``,
   ``C = Σ_f C_f``.
2. For each fold ``f`` and each candidate ``t``: fit on the other folds, ``C₋f = C - C_f``
   shrunk by ``t``, and score the held-out output error the fix leaves,
   ``tr((ΔW - B A) C_f (ΔW - B A)ᵀ)``. Optionally plain SVD (which uses no data) is a candidate too.
3. Each layer takes the candidate with the least error summed over the folds; the caller then
   solves on all the data with it.

Every ``t`` of one fold comes from one eigendecomposition: with ``D = diag(C₋f)`` and the
correlations ``R = D^-½ C₋f D^-½ = V diag(μ) Vᵀ``, the shrunk matrix factors as ``L Lᵀ`` with
``L = D^½ V diag(√((1-t) μ + t))``, and the best rank-r fix in the norm ``|| · L ||_F`` depends on
``L Lᵀ`` only: ``B A = [ΔW L]_r L⁻¹``. When ``N <= K`` that is ``U Uᵀ ΔW`` with ``U`` the top-r
eigenvectors of ``ΔW S ΔWᵀ = (1 - t) ΔW C₋f ΔWᵀ + t ΔW D ΔWᵀ`` (two ``[N, N]`` matrices per fold; the
error left on fold ``f`` is ``tr((I - U Uᵀ) ΔW C_f ΔWᵀ)``); when ``N > K`` it is ``M W Wᵀ L⁻¹`` with ``W``
the top-r eigenvectors of ``Mᵀ M``, ``M = ΔW L``. Top-r eigenvectors of the candidates after the
first (exact ``eigh``) come from a few steps of subspace iteration warm-started at the same
candidate's on the previous fold, or the previous candidate's (these are scores; the final solve,
by the caller, is exact). Pure torch; no I/O.
"""

from __future__ import annotations

import torch

#: candidate name of plain SVD in :func:`heldout_errors` / :func:`choose_shrinkage`
SVD = "svd"
#: variances (diagonal of ``C₋f``) and shrunk correlation eigenvalues are floored at this fraction of their maximum
REL_FLOOR = 1e-8
#: subspace iteration (:func:`_top_eigvecs`): extra columns beyond the rank, and steps per warm-started call
OVERSAMPLE = 16
ITERS = 6


def _top_eigvecs(g: torch.Tensor, r: int, start: torch.Tensor | None = None, iters: int | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``r`` eigenvectors ``[n, r]`` of a symmetric PSD ``g [n, n]`` (fp64), and the block of
    ``q = r + OVERSAMPLE`` leading eigenvectors ``[n, q]`` to warm-start the next call with. Exact
    (``eigh``) without ``start`` or when ``2q >= n``; else ``iters`` steps of subspace iteration from
    ``start``, then Rayleigh-Ritz."""
    n = g.shape[0]
    q = r + OVERSAMPLE
    if start is None or 2 * q >= n:
        _, v = torch.linalg.eigh(0.5 * (g + g.t()))  # ascending
        v = v.flip(-1)  # largest first
        return v[:, :r], v[:, :q]
    x = start
    for _ in range(ITERS if iters is None else iters):
        x = torch.linalg.qr(g @ x).Q  # [n, q]
    _, y = torch.linalg.eigh(x.t() @ g @ x)  # Rayleigh-Ritz, ascending
    x = x @ y.flip(-1)  # Ritz vectors, largest first
    return x[:, :r], x


def _error(e0: float, b: torch.Tensor, a: torch.Tensor, dw_h: torch.Tensor, h: torch.Tensor) -> float:
    """``tr((ΔW - B A) H (ΔW - B A)ᵀ)`` from ``e0 = tr(ΔW H ΔWᵀ)`` and ``dw_h = ΔW H [N, K]``."""
    cross = float((b * (dw_h @ a.t())).sum())  # tr(B A H ΔWᵀ)
    return e0 - 2 * cross + float(((b.t() @ b) * (a @ h @ a.t())).sum())


def _correlation_basis(train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``C₋f [K, K]`` -> ``D^½ [K]``, ``μ [K]``, ``V [K, K]`` with ``D^-½ C₋f D^-½ = V diag(μ) Vᵀ``."""
    var = train.diagonal().clamp_min(0)
    d = var.clamp_min(max(float(var.max()) * REL_FLOOR, 1e-300)).sqrt()
    mu, v = torch.linalg.eigh(train / d[:, None] / d[None, :])
    return d, mu.clamp_min(0), v


def _scale(mu: torch.Tensor, t: float) -> torch.Tensor:
    """``√`` of the eigenvalues ``(1 - t) μ + t`` of ``(1 - t) R + t I``, floored."""
    lam = (1 - t) * mu + t
    return lam.clamp_min(float(lam.max()) * REL_FLOOR).sqrt()


def _layer_errors(dw: torch.Tensor, folds: list[torch.Tensor], r: int, grid: tuple[float, ...], svd: bool,
                  basis) -> list[float]:
    """One layer's held-out error per candidate, summed over folds. ``basis(f)``: the
    :func:`_correlation_basis` of fold ``f``'s training part (shared by the layers of one input)."""
    n, k = dw.shape
    err = [0.0] * (len(grid) + int(svd))
    if n <= k:  # output side: every candidate's fix is B A = U Uᵀ ΔW, U the top-r eigenvectors of ΔW S ΔWᵀ
        q_f = [dw @ h @ dw.t() for h in folds]  # ΔW C_f ΔWᵀ  [N, N]
        qd_f = [(dw * h.diagonal()) @ dw.t() for h in folds]  # ΔW diag(C_f) ΔWᵀ
        q_all, qd_all = sum(q_f), sum(qd_f)
        u_svd = _top_eigvecs(dw @ dw.t(), r)[0] if svd else None
        warm: list = [None] * len(grid)  # per candidate: its eigenvectors on the previous fold
        for f, (qh, qdh) in enumerate(zip(q_f, qd_f)):
            e0 = float(qh.trace())
            for j, t in enumerate(grid):
                start = warm[j] if warm[j] is not None else (warm[j - 1] if j else None)
                u, warm[j] = _top_eigvecs((1 - t) * (q_all - qh) + t * (qd_all - qdh), r, start)
                err[j] += e0 - float((u * (qh @ u)).sum())  # tr((I - U Uᵀ) Q_f)
            if svd:
                err[-1] += e0 - float((u_svd * (qh @ u_svd)).sum())
        return err
    # input side (N > K): B A = [ΔW L]_r L⁻¹ with L = D^½ V diag(s); [M]_r = M W Wᵀ, W top-r of Mᵀ M
    gram = dw.t() @ dw  # ΔWᵀ ΔW  [K, K]
    svd_fix = None
    if svd:
        w = _top_eigvecs(gram, r)[0]
        svd_fix = (dw @ w, w.t())
    warm: list = [None] * len(grid)
    for f, h in enumerate(folds):
        d, mu, v = basis(f)
        dw_h = dw @ h  # ΔW H  [N, K]
        e0 = float((dw_h * dw).sum())
        p = v.t() @ (gram * d[:, None] * d[None, :]) @ v  # Gᵀ G, G = ΔW D^½ V
        g = (dw * d) @ v  # [N, K]
        for j, t in enumerate(grid):
            s = _scale(mu, t)
            start = warm[j] if warm[j] is not None else (warm[j - 1] if j else None)
            w, warm[j] = _top_eigvecs(p * s[:, None] * s[None, :], r, start)  # Mᵀ M = diag(s) Gᵀ G diag(s)
            err[j] += _error(e0, (g * s) @ w, ((w.t() / s) @ v.t()) / d, dw_h, h)
        if svd:
            err[-1] += _error(e0, *svd_fix, dw_h, h)
    return err


def heldout_errors(delta_ws: list[torch.Tensor], fold_xtx: list[torch.Tensor], ranks: list[int],
                   grid: tuple[float, ...], svd: bool = False, cache: dict | None = None) -> torch.Tensor:
    """Held-out output error ``[L, C]`` (fp64) of each layer (``delta_ws``: ``ΔW_l [N_l, K]``, one shared
    input) for each candidate: the shrinkages ``grid`` (each ``t`` in [0, 1]), then plain SVD if ``svd``.
    ``fold_xtx``: ``XᵀX`` of each fold ``[K, K]`` (at least 2). Summed over the folds, each fold held
    out once. ``cache``: a dict kept across calls on the same ``fold_xtx`` (layers sharing an input)."""
    if len(fold_xtx) < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {len(fold_xtx)}")
    if not grid or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t <= 1 for t in grid):
        raise ValueError(f"shrinkage grid must be a non-empty list of numbers in [0, 1], got {grid!r}")
    k = fold_xtx[0].shape[0]
    for i, dw in enumerate(delta_ws):
        if dw.ndim != 2 or dw.shape[1] != k:
            raise ValueError(f"ΔW #{i} has shape {tuple(dw.shape)}; expected [out, {k}] (the folds' in_features)")
    folds = [c.to(torch.float64) for c in fold_xtx]
    total = sum(folds)
    bases = {} if cache is None else cache

    def basis(f):
        if f not in bases:
            bases[f] = _correlation_basis(total - folds[f])
        return bases[f]

    rows = [_layer_errors(dw.to(torch.float64), folds, min(r, *dw.shape), tuple(float(t) for t in grid), svd, basis)
            for dw, r in zip(delta_ws, ranks)]
    return torch.tensor(rows, dtype=torch.float64)


def choose_shrinkage(delta_ws: list[torch.Tensor], fold_xtx: list[torch.Tensor], ranks: list[int],
                     candidates: tuple, cache: dict | None = None) -> list[float | str]:
    """Per layer, the candidate with the least held-out error (:func:`heldout_errors`): a shrinkage
    ``t`` of ``candidates``, or :data:`SVD` if it is one of them. Ties go to the earlier candidate."""
    grid = tuple(float(c) for c in candidates if c != SVD)
    svd = SVD in candidates
    if not grid:  # plain SVD alone: nothing to choose
        return [SVD] * len(delta_ws)
    err = heldout_errors(delta_ws, fold_xtx, ranks, grid, svd, cache)
    names = list(grid) + ([SVD] if svd else [])
    return [names[int(row.argmin())] for row in err]
