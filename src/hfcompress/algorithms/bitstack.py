"""BitStack (Wang et al., 2024): any-size compression by iterative residual blocks.

A weight ``W [N, K]`` is first scaled per input channel by the activations it sees,
``W' = W diag(s)`` with ``s_k = rms(x_k) + 1e-3`` (activation-aware: columns that see large inputs
matter more). Then, for ``i = 1..n_blocks``, the residual ``R`` (initially ``W'``) is approximated
by one block::

    S_i = sign(R)                          [N, K]  (1 bit per weight)
    |R| ~= U Sigma V^T  (rank r truncated SVD; :func:`top_singular`)       u_i = U_r sqrt(Sigma_r)  [N, r],  v_i = sqrt(Sigma_r) V_r^T  [r, K]
    B_i = S_i * (u_i v_i)                  [N, K]
    R  <- R - B_i

and ``W ~= (sum_{i<=n} B_i) diag(s)^-1`` for any prefix ``n`` of the blocks. Each block costs
``N K + 16 r (N + K)`` bits in fp16 (``r = 16``: about 1.6-1.9 bits per weight on SmolLM2's
layers). The importance of block ``i`` is the drop of the scaled residual's energy it brings,
``||R_{i-1}||^2 - ||R_i||^2`` (in the activation-scaled space, where it tracks the output error);
blocks of all layers are later stacked by it (``hfcompress.formats.bitstack``).

Pure torch; shapes in comments; no I/O.
"""

from __future__ import annotations

import torch


def activation_scale(xtx_diag: torch.Tensor, n_tokens: int, eps: float = 1e-3) -> torch.Tensor:
    """``s [K]`` = rms of each input channel over the calibration tokens + ``eps`` (from
    ``diag(X^T X)``); all ones when there is no data (``n_tokens == 0``)."""
    if n_tokens == 0:
        return torch.ones_like(xtx_diag, dtype=torch.float32)
    return (xtx_diag.float().clamp_min(0) / n_tokens).sqrt() + eps


def top_singular(A: torch.Tensor, r: int, n_iter: int = 6, oversample: int = 8, seed: int = 0):
    """The ``r`` largest singular triplets of ``A [N, K]``: ``U [N, r]``, ``S [r]``, ``Vh [r, K]``.
    Randomized subspace iteration (Halko, Martinsson & Tropp, 2011): a seeded Gaussian sketch of
    ``q = r + oversample`` columns, ``n_iter`` power iterations re-orthonormalised by QR, then
    the exact SVD of the small ``[q, K]`` projection; a full SVD when ``q >= min(N, K)``. For
    BitStack's ``r`` of 1-16 this costs a few thin matmuls instead of a full decomposition."""
    n, k = A.shape
    q = r + oversample
    if q >= min(n, k):
        U, S, Vh = torch.linalg.svd(A, full_matrices=False)
        return U[:, :r], S[:r], Vh[:r]
    g = torch.Generator(device=A.device).manual_seed(seed)
    omega = torch.randn(k, q, generator=g, device=A.device, dtype=A.dtype)  # [K, q]
    Q = torch.linalg.qr(A @ omega).Q                                           # [N, q]
    for _ in range(n_iter):
        Z = torch.linalg.qr(A.t() @ Q).Q                                       # [K, q]
        Q = torch.linalg.qr(A @ Z).Q                                           # [N, q]
    Ub, S, Vh = torch.linalg.svd(Q.t() @ A, full_matrices=False)              # [q, q], [q], [q, K]
    return (Q @ Ub)[:, :r], S[:r], Vh[:r]


@torch.no_grad()
def bitstack_decompose(weight: torch.Tensor, scale: torch.Tensor, n_blocks: int, rank: int):
    """``weight [N, K]``, ``scale [K]`` -> ``signs [n, N, K]`` (bool, True = negative),
    ``u [n, N, r]``, ``v [n, r, K]`` (fp16, as stored), ``gain [n]`` (energy drop of each block
    relative to the scaled weight's energy: comparable across layers).

    Each block is fitted to the residual left by the *stored* (fp16-rounded) earlier blocks, so
    any prefix reconstructs exactly what the layer computes."""
    W = weight.detach().to(torch.float32) * scale.to(torch.float32)[None, :]   # [N, K] scaled
    n, k = W.shape
    r = min(rank, n, k)
    signs = torch.empty(n_blocks, n, k, dtype=torch.bool, device=W.device)
    us = torch.empty(n_blocks, n, r, dtype=torch.float16, device=W.device)
    vs = torch.empty(n_blocks, r, k, dtype=torch.float16, device=W.device)
    gain = torch.empty(n_blocks, dtype=torch.float64)
    R = W.clone()                                                               # [N, K] residual
    energy = R.double().pow(2).sum().item()
    total = max(energy, 1e-30)
    for i in range(n_blocks):
        neg = R < 0                                                             # [N, K] sign plane
        U, S, Vh = top_singular(R.abs(), r)                                     # |R| ~= U diag(S) Vh
        root = S.sqrt()                                                         # [r]
        u = (U * root[None, :]).to(torch.float16)                               # [N, r]
        v = (root[:, None] * Vh).to(torch.float16)                              # [r, K]
        block = torch.where(neg, -1.0, 1.0) * (u.float() @ v.float())           # [N, K]
        R -= block
        new_energy = R.double().pow(2).sum().item()
        signs[i], us[i], vs[i], gain[i] = neg, u, v, (energy - new_energy) / total
        energy = new_energy
    return signs, us, vs, gain


def reconstruct(signs: torch.Tensor, u: torch.Tensor, v: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``sum_i S_i * (u_i v_i)`` unscaled: the weight ``[N, K]`` (fp32) of a prefix of blocks."""
    n, k = signs.shape[1], signs.shape[2]
    W = torch.zeros(n, k, dtype=torch.float32, device=u.device)
    for i in range(signs.shape[0]):
        W += torch.where(signs[i], -1.0, 1.0) * (u[i].float() @ v[i].float())
    return W / scale.to(torch.float32)[None, :]
