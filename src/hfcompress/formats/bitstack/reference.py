"""The bitstack spec in code: sign-plane packing, dequantize and the reference matmul."""

from __future__ import annotations

import torch

from .spec import sign_words

_BITS = torch.arange(32, dtype=torch.int64)


def pack_signs(neg: torch.Tensor) -> torch.Tensor:
    """``neg [..., K]`` (bool, True = negative) -> ``[..., ceil(K/32)]`` int32: bit ``j`` of word
    ``w`` is element ``32 w + j`` (little-endian bit stream, zero padding)."""
    k = neg.shape[-1]
    pad = sign_words(k) * 32 - k
    bits = torch.nn.functional.pad(neg.to(torch.int64), (0, pad)).reshape(*neg.shape[:-1], -1, 32)
    words = (bits << _BITS.to(neg.device)).sum(-1)                      # [..., W] in [0, 2^32)
    return (words - ((words >= 2**31).to(torch.int64) << 32)).to(torch.int32)


def unpack_signs(words: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: ``[..., W]`` int32 -> ``[..., K]`` bool."""
    bits = (words.to(torch.int64)[..., None] >> _BITS.to(words.device)) & 1  # [..., W, 32]
    return bits.reshape(*words.shape[:-1], -1)[..., :k].bool()


def dequantize(signs: torch.Tensor, u: torch.Tensor, v: torch.Tensor, in_scale: torch.Tensor, in_features: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``W [N, K] = (sum_i S_i * (u_i v_i)) / s`` over the blocks held (fp32, then cast);
    no block: zeros."""
    n = signs.shape[1]
    w = torch.zeros(n, in_features, dtype=torch.float32, device=u.device)
    for i in range(signs.shape[0]):
        neg = unpack_signs(signs[i], in_features)                        # [N, K]
        w += torch.where(neg, -1.0, 1.0) * (u[i].float() @ v[i].float())  # [N, K]
    return (w / in_scale.float()[None, :]).to(dtype)


def bitstack_mm_ref(x: torch.Tensor, signs: torch.Tensor, u: torch.Tensor, v: torch.Tensor, in_scale: torch.Tensor,
                    bias: torch.Tensor | None, in_features: int) -> torch.Tensor:
    """``y = x W^T + b`` with ``W`` from :func:`dequantize` (fp32 matmul, output in x's dtype)."""
    w = dequantize(signs, u, v, in_scale, in_features)
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
