"""EoRA: training-free eigenspace low-rank compensation of a compressed linear layer.

Given the float weight ``W [N, K]`` and the weight ``W_c [N, K]`` the compressed layer
really computes with, find ``B [N, r]``, ``A [r, K]`` so that ``W_c + B A`` reproduces
``W`` on the layer's inputs ``X [T, K]``, i.e. minimise ``|| (W - W_c - B A) Xᵀ ||_F``.

1. ``ΔW = W - W_c``.
2. ``XᵀX = Q Λ Qᵀ`` (eigh, fp64); eigenvalues below a floor are raised to it (negative
   ones come from round-off on a positive semi-definite matrix, tiny ones from directions
   the inputs never excite: both would blow up ``Λ^{-1/2}``).
3. Project into the eigenspace, weighted by the activation scale: ``ΔW' = ΔW Q √Λ``.
   ``|| ΔW Xᵀ ||_F = || ΔW' ||_F``, so the best rank-r ``ΔW'`` is the best rank-r fix.
4. Rank-r SVD ``ΔW' ≈ U_r Σ_r V_rᵀ``; project back:
   ``B = U_r √Σ_r``, ``A = √Σ_r V_rᵀ (√Λ)⁻¹ Qᵀ``.

:func:`svd_compensation` is the plain-SVD baseline (step 2 skipped: ``Λ = I``).

Shrinkage (not in the paper; ``EoRAConfig.shrinkage``): ``XᵀX`` of a few calibration windows
over-fits them, so step 2 may take :func:`shrink_to_diagonal` ``(1 - t) XᵀX + t diag(XᵀX)`` instead:
each input channel keeps its scale, the cross-channel correlations are shrunk by ``t``
(``t = 0``: the paper's EoRA; ``t = 1``: SVD of ``ΔW D^½`` mapped back by ``D^-½``, ``D = diag(XᵀX)``).
:mod:`hfcompress.algorithms.eora_cv` chooses ``t`` per layer by cross-validation.
Pure torch; no I/O.
"""

from __future__ import annotations

import torch

#: eigenvalues are floored at ``EIG_REL_FLOOR * max(λ)`` (and never below ``EIG_ABS_FLOOR``)
EIG_REL_FLOOR = 1e-8
EIG_ABS_FLOOR = 1e-12


def activation_eigenbasis(xtx: torch.Tensor, rel_floor: float = EIG_REL_FLOOR) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``XᵀX [K, K]`` -> ``(Q [K, K] fp64, λ [K] fp64 floored, n_floored)``."""
    if xtx.ndim != 2 or xtx.shape[0] != xtx.shape[1]:
        raise ValueError(f"XᵀX must be a square [K, K] matrix, got shape {tuple(xtx.shape)}")
    if not torch.isfinite(xtx).all():
        raise ValueError("XᵀX contains non-finite values (inf/nan activations in the calibration data)")
    h = xtx.to(torch.float64)
    h = 0.5 * (h + h.t())  # exact symmetry before eigh
    lam, q = torch.linalg.eigh(h)  # λ ascending [K], Q [K, K]
    floor = max(float(lam.max().clamp_min(0)) * rel_floor, EIG_ABS_FLOOR)
    n_floored = int((lam < floor).sum())
    lam = lam.clamp_min(floor)  # negative (round-off) and tiny (unexcited) directions
    return q, lam, n_floored


def shrink_to_diagonal(xtx: torch.Tensor, t: float) -> torch.Tensor:
    """``(1 - t) XᵀX + t diag(XᵀX)`` [K, K] (fp64), ``t`` in [0, 1]; ``t = 0`` returns ``xtx`` itself."""
    if not (isinstance(t, (int, float)) and 0 <= t <= 1):
        raise ValueError(f"shrinkage must be a number in [0, 1], got {t!r}")
    if not t:
        return xtx
    c = xtx.to(torch.float64)
    return (1 - t) * c + t * torch.diag(c.diagonal())  # correlations shrunk, channel scales kept


def _truncated_svd(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``m [N, K]`` (fp64) -> ``U_r [N, r]``, ``Σ_r [r]``, ``V_rᵀ [r, K]``."""
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]


def _check(delta_w: torch.Tensor, rank: int) -> int:
    if delta_w.ndim != 2:
        raise ValueError(f"ΔW must be [out_features, in_features], got shape {tuple(delta_w.shape)}")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    return min(rank, *delta_w.shape)


def eora_compensation(delta_w: torch.Tensor, xtx: torch.Tensor, rank: int, rel_floor: float = EIG_REL_FLOOR,
                      basis: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """EoRA: ``ΔW [N, K]``, ``XᵀX [K, K]`` -> ``B [N, r]``, ``A [r, K]`` (fp32), ``r = min(rank, N, K)``.
    ``basis``: :func:`activation_eigenbasis` of this ``XᵀX`` if already computed (layers sharing an input)."""
    r = _check(delta_w, rank)
    if xtx.shape != (delta_w.shape[1], delta_w.shape[1]):
        raise ValueError(f"XᵀX has shape {tuple(xtx.shape)}, expected [{delta_w.shape[1]}, {delta_w.shape[1]}] "
                         "(in_features of ΔW)")
    q, lam, _ = basis if basis is not None else activation_eigenbasis(xtx, rel_floor)  # Q [K, K], λ [K]
    sqrt_lam = lam.sqrt()  # √Λ [K]
    dw = delta_w.to(torch.float64)  # ΔW [N, K]
    dw_proj = (dw @ q) * sqrt_lam  # ΔW' = ΔW Q √Λ  [N, K]
    u, s, vh = _truncated_svd(dw_proj, r)  # [N, r], [r], [r, K]
    sqrt_s = s.sqrt()
    b = u * sqrt_s  # B = U_r √Σ_r  [N, r]
    a = (sqrt_s[:, None] * vh / sqrt_lam) @ q.t()  # A = √Σ_r V_rᵀ (√Λ)⁻¹ Qᵀ  [r, K]
    return b.to(torch.float32), a.to(torch.float32)


def svd_compensation(delta_w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain SVD baseline: best rank-r ``ΔW`` in Frobenius norm, ignoring the inputs."""
    r = _check(delta_w, rank)
    u, s, vh = _truncated_svd(delta_w.to(torch.float64), r)
    sqrt_s = s.sqrt()
    return (u * sqrt_s).to(torch.float32), (sqrt_s[:, None] * vh).to(torch.float32)


def output_error(delta_w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, xtx: torch.Tensor) -> float:
    """``|| (ΔW - B A) Xᵀ ||_F²`` from ``XᵀX``: the error the compensation leaves on the inputs."""
    e = delta_w.to(torch.float64) - b.to(torch.float64) @ a.to(torch.float64)  # [N, K]
    return float(torch.einsum("nk,kl,nl->", e, xtx.to(torch.float64), e))
