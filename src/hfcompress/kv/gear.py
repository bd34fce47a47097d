"""GEAR: KV-cache compression by quantization + low-rank residual + sparse outliers.

Kang et al., 2024, "GEAR: An Efficient KV Cache Compression Recipe for Near-Lossless Generative
Inference of LLM". A matrix X of cached keys (or values) is approximated by

    X  ~=  D + L + S
    S = Filter_s(X)          the s-fraction of entries that stretch the quantization ranges most,
                             kept exactly (values + positions)
    D = Quant_b(X - S)       uniform b-bit quantization, K per channel, V per token, in groups
    L = A @ B  ~= X - S - D  rank-r approximation of the quantization residual, per head,
                             found by a few power iterations

Everything here is pure torch and works on any device. Shapes: one *chunk* of n tokens of one
layer, batched over B (batch) x H (key/value heads) x C (chunks): X [B, H, C, n, d], d = head_dim.
The cache (kv/cache.py) keeps chunks of equal size n, so decompressing the whole cache is a
handful of batched ops, whatever its length.

One deliberate reading of Filter_s: the paper keeps the s/2 largest and s/2 smallest entries of
each vector; here the k = ceil(s * n * d) entries of each (batch, head, chunk) matrix farthest
from the mean of their quantization vector (channel for K, token for V) are kept. Both tails are
taken, the count is the paper's, and an offset channel of K (large but constant) is not wasted
on outliers that per-channel quantization handles anyway.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_SUPPORTED_BITS = (2, 4, 8)


@dataclass(frozen=True)
class GEARSpec:
    """What one compressed chunk looks like. ``rank=0`` switches the low-rank residual off,
    ``outlier_ratio=0`` the sparse outliers; quantization is the backbone and always on."""

    bits: int = 4
    group_size: int = 64       # K: tokens per group (per channel); V: channels per group (per token)
    rank: int = 4              # per head and chunk
    outlier_ratio: float = 0.01
    power_iters: int = 2
    chunk_size: int = 64       # n: tokens per compressed chunk (the streaming buffer's size)

    def __post_init__(self):
        if self.bits not in _SUPPORTED_BITS:
            raise ValueError(f"GEAR bits={self.bits}: supported are {_SUPPORTED_BITS}")
        if self.group_size < 1:
            raise ValueError(f"GEAR group_size={self.group_size} must be >= 1")
        if self.chunk_size < 1:
            raise ValueError(f"GEAR buffer_size={self.chunk_size} must be >= 1")
        if self.key_group(self.chunk_size) and self.chunk_size % self.key_group(self.chunk_size):
            raise ValueError(
                f"GEAR buffer_size={self.chunk_size} must be a multiple of group_size={self.group_size} "
                "(keys are quantized per channel in groups of group_size tokens of each chunk)")
        if self.rank < 0:
            raise ValueError(f"GEAR rank={self.rank} must be >= 0 (0 switches the low-rank residual off)")
        if not 0.0 <= self.outlier_ratio < 0.5:
            raise ValueError(f"GEAR outlier_ratio={self.outlier_ratio} must be in [0, 0.5)")
        if self.power_iters < 1:
            raise ValueError(f"GEAR power_iters={self.power_iters} must be >= 1")

    def key_group(self, n: int) -> int:
        return min(self.group_size, n)

    def value_group(self, d: int) -> int:
        return min(self.group_size, d)

    def n_outliers(self, n: int, d: int) -> int:
        return math.ceil(self.outlier_ratio * n * d) if self.outlier_ratio > 0 else 0

    def effective_rank(self, n: int, d: int) -> int:
        return min(self.rank, n, d)


# ---------------------------------------------------------------------------------------------
# uniform b-bit quantization in groups along the last axis, codes packed into bytes

def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [..., m] (uint8, < 2**bits) -> [..., m * bits / 8] uint8, little end first."""
    per = 8 // bits
    c = codes.reshape(*codes.shape[:-1], -1, per).to(torch.uint8)        # [..., m/per, per]
    shifts = torch.arange(0, 8, bits, device=codes.device, dtype=torch.uint8)
    return (c << shifts).sum(-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., m * bits / 8] uint8 -> codes [..., m] uint8."""
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
    mask = (1 << bits) - 1
    return ((packed.unsqueeze(-1) >> shifts) & mask).flatten(-2)


def quantize_groups(x: torch.Tensor, bits: int, group: int):
    """x [..., m] (m a multiple of group) -> codes [..., m] uint8, scale [..., m/group], low [..., m/group].
    Asymmetric min-max: x ~= codes * scale + low."""
    g = x.reshape(*x.shape[:-1], -1, group).float()                       # [..., m/g, g]
    low, high = g.amin(-1), g.amax(-1)
    scale = ((high - low) / (2 ** bits - 1)).clamp_min(1e-8)
    codes = torch.round((g - low.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp_(0, 2 ** bits - 1)
    return codes.reshape(x.shape).to(torch.uint8), scale, low


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, dtype) -> torch.Tensor:
    """codes [..., m], scale/low [..., m/g] -> [..., m] in dtype."""
    g = codes.reshape(*scale.shape, -1).to(dtype)                          # [..., m/g, g]
    return (g * scale.unsqueeze(-1).to(dtype) + low.unsqueeze(-1).to(dtype)).reshape(codes.shape)


# ---------------------------------------------------------------------------------------------
# the three pieces

def select_outliers(x: torch.Tensor, per_channel: bool, k: int):
    """x [B, H, C, n, d] -> (index [B, H, C, k] into the flattened n*d matrix, value [B, H, C, k]).
    The k entries farthest from the mean of their quantization vector (channel if per_channel,
    else token)."""
    center = x.mean(dim=-2 if per_channel else -1, keepdim=True)          # [B,H,C,1,d] or [B,H,C,n,1]
    score = (x - center).abs().flatten(-2)                                # [B, H, C, n*d]
    index = score.topk(k, dim=-1, sorted=False).indices
    return index, x.flatten(-2).gather(-1, index)


def start_matrix(d: int, rank: int, seed: int) -> torch.Tensor:
    """The seeded Gaussian start [d, rank] of the power iteration (on CPU; one for every head and
    chunk, so a chunk compresses the same whether it arrived in a long prompt or token by token)."""
    return torch.randn(d, rank, generator=torch.Generator().manual_seed(seed))


def power_iteration(r: torch.Tensor, q: torch.Tensor, iters: int):
    """Rank-k approximation r [..., n, d] ~= a [..., n, k] @ b [..., k, d] by subspace (power)
    iteration from the start q [d, k], as in PowerSGD and the GEAR paper."""
    r = r.float()
    q = q.to(device=r.device, dtype=torch.float32).expand(*r.shape[:-2], *q.shape)     # [..., d, k]
    for _ in range(iters):
        p = torch.linalg.qr(r @ q).Q                                      # [..., n, k] orthonormal
        q = r.transpose(-1, -2) @ p                                        # [..., d, k]
    return p, q.transpose(-1, -2)                                         # a [..., n, k], b [..., k, d]


def compress(x: torch.Tensor, spec: GEARSpec, per_channel: bool, seed: int = 0):
    """GEAR-compress chunks x [B, H, C, n, d]. Keys: per_channel=True (groups of group_size tokens of
    one channel); values: per_channel=False (groups of group_size channels of one token).
    Returns a dict of tensors (the only state the cache keeps)."""
    B, H, C, n, d = x.shape
    dtype = x.dtype
    out: dict[str, torch.Tensor] = {}
    xf = x.float()

    # 1. S = Filter_s(X): outliers kept exactly; their places take the vector's mean, so they no
    #    longer stretch the quantization range
    k = spec.n_outliers(n, d)
    if k:
        index, value = select_outliers(xf, per_channel, k)
        center = xf.mean(dim=-2 if per_channel else -1, keepdim=True).expand_as(xf).flatten(-2)
        xf = xf.flatten(-2).scatter(-1, index, center.gather(-1, index)).reshape(B, H, C, n, d)
        out["outlier_index"] = index.to(torch.int16 if n * d <= 2 ** 15 else torch.int32)
        out["outlier_value"] = value.to(dtype)

    # 2. D = Quant_b(X - S): K per channel (groups along tokens), V per token (groups along channels)
    if per_channel:
        g = spec.key_group(n)
        codes, scale, low = quantize_groups(xf.transpose(-1, -2), spec.bits, g)   # [B,H,C,d,n], [B,H,C,d,n/g]
        codes = codes.transpose(-1, -2)                                   # back to [B, H, C, n, d]
    else:
        g = spec.value_group(d)
        if d % g:
            raise ValueError(f"GEAR group_size={spec.group_size} must divide head_dim={d} for values "
                             "(quantized per token in groups of channels)")
        codes, scale, low = quantize_groups(xf, spec.bits, g)            # [B,H,C,n,d], [B,H,C,n,d/g]
    out["codes"] = pack(codes.flatten(-2), spec.bits)                      # [B, H, C, n*d*bits/8]
    out["scale"], out["low"] = scale.to(dtype), low.to(dtype)

    # 3. L = A @ B ~= (X - S) - D: the quantization residual, rank r per head, by power iteration.
    #    The residual is taken against what decompression will produce (scale/low in dtype).
    r = spec.effective_rank(n, d)
    if r:
        deq = _dequantize_stored(out, spec, per_channel, (B, H, C, n, d), torch.float32)
        residual = xf - deq                                               # [B, H, C, n, d]
        a, b = power_iteration(residual, start_matrix(d, r, seed), spec.power_iters)
        out["lowrank_a"], out["lowrank_b"] = a.to(dtype), b.to(dtype)     # [B,H,C,n,r], [B,H,C,r,d]
    return out


def _dequantize_stored(state: dict, spec: GEARSpec, per_channel: bool, shape, dtype) -> torch.Tensor:
    B, H, C, n, d = shape
    codes = unpack(state["codes"], spec.bits).reshape(B, H, C, n, d)
    if per_channel:
        return dequantize_groups(codes.transpose(-1, -2), state["scale"], state["low"], dtype).transpose(-1, -2)
    return dequantize_groups(codes, state["scale"], state["low"], dtype)


def decompress(state: dict, spec: GEARSpec, per_channel: bool, shape, dtype) -> torch.Tensor:
    """X^ = D + A @ B, then the outliers S put back exactly: [B, H, C, n, d] in dtype.
    Computed in float32 (much faster than bf16 elementwise math on CPUs), cast once at the end."""
    x = _dequantize_stored(state, spec, per_channel, shape, torch.float32)  # D   [B, H, C, n, d]
    if "lowrank_a" in state:                                                # + L = A @ B
        x = x + torch.einsum("bhcnr,bhcrd->bhcnd", state["lowrank_a"].float(), state["lowrank_b"].float())
    if "outlier_index" in state:                                            # S, exactly
        x = x.flatten(-2).scatter_(-1, state["outlier_index"].long(), state["outlier_value"].float())
    return x.reshape(shape).to(dtype)
