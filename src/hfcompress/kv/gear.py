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

One formulation serves both: a chunk is handled as a matrix M [rows, cols] quantized along its
rows in groups of columns. Values: M = V [n, d] (per token). Keys: M = K^T [d, n] (per channel),
which is also the layout their statistics and codes are stored in.

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
    """codes [..., m] (uint8, < 2**bits) -> [..., m * bits / 8] uint8, low bits first."""
    per = 8 // bits
    c = codes.reshape(*codes.shape[:-1], -1, per).to(torch.uint8)        # [..., m/per, per]
    shifts = torch.arange(0, 8, bits, device=codes.device, dtype=torch.uint8)
    return (c << shifts).sum(-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., m * bits / 8] uint8 -> codes [..., m] uint8."""
    if bits == 8:
        return packed
    mask = (1 << bits) - 1   # python-int shifts: a broadcast uint8 shift tensor is ~100x slower on CPU
    parts = [packed & mask] + [(packed >> s) & mask for s in range(bits, 8 - bits, bits)] + [packed >> (8 - bits)]
    return torch.stack(parts, dim=-1).flatten(-2)


def quantize_groups(x: torch.Tensor, bits: int, group: int):
    """x [..., m] (m a multiple of group) -> codes [..., m] uint8, scale [..., m/g], low [..., m/g].
    Asymmetric min-max: x ~= codes * scale + low."""
    g = x.reshape(*x.shape[:-1], -1, group).float()                       # [..., m/g, g]
    low, high = g.amin(-1), g.amax(-1)
    scale = ((high - low) / (2 ** bits - 1)).clamp_min(1e-8)
    codes = torch.round((g - low.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp_(0, 2 ** bits - 1)
    return codes.reshape(x.shape).to(torch.uint8), scale, low


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """codes [..., m], scale/low [..., m/g] -> float32 [..., m]."""
    g = codes.reshape(*scale.shape, -1).float()                            # [..., m/g, g]
    return (g * scale.float().unsqueeze(-1) + low.float().unsqueeze(-1)).reshape(codes.shape)


# ---------------------------------------------------------------------------------------------
# the three pieces, on matrices M [..., rows, cols] (rows = quantization vectors)

def select_outliers(m: torch.Tensor, k: int):
    """m [..., rows, cols] -> (index [..., k] into the flattened rows*cols matrix, value [..., k]):
    the k entries farthest from the mean of their row (their quantization vector)."""
    score = (m - m.mean(-1, keepdim=True)).abs().flatten(-2)              # [..., rows*cols]
    index = score.topk(k, dim=-1, sorted=False).indices
    return index, m.flatten(-2).gather(-1, index)


def start_matrix(cols: int, rank: int, seed: int) -> torch.Tensor:
    """The seeded Gaussian start [cols, rank] of the power iteration (on CPU; one for every head and
    chunk, so a chunk compresses the same whether it arrived in a long prompt or token by token)."""
    return torch.randn(cols, rank, generator=torch.Generator().manual_seed(seed))


def power_iteration(r: torch.Tensor, q: torch.Tensor, iters: int):
    """Rank-k approximation r [..., rows, cols] ~= a [..., rows, k] @ b [..., k, cols] by subspace
    (power) iteration from the start q [cols, k], as in PowerSGD and the GEAR paper."""
    r = r.float()
    q = q.to(device=r.device, dtype=torch.float32).expand(*r.shape[:-2], *q.shape)  # [..., cols, k]
    for _ in range(iters):
        p = torch.linalg.qr(r @ q).Q                                      # [..., rows, k] orthonormal
        q = r.transpose(-1, -2) @ p                                        # [..., cols, k]
    return p, q.transpose(-1, -2)                                         # a [..., rows, k], b [..., k, cols]


def as_matrix(x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """Chunks [B, H, C, n, d] -> the matrices GEAR works on: K^T [B, H, C, d, n] for keys (per
    channel), V [B, H, C, n, d] for values (per token)."""
    return x.transpose(-1, -2) if per_channel else x


def compress(x: torch.Tensor, spec: GEARSpec, per_channel: bool, seed: int = 0):
    """GEAR-compress chunks x [B, H, C, n, d]: keys with per_channel=True (groups of group_size
    tokens of one channel), values with per_channel=False (groups of group_size channels of one
    token). Returns a dict of tensors, the only state the cache keeps (M = as_matrix(x)):
    codes [B, H, C, rows*cols*bits/8] uint8, scale / low [B, H, C, rows, cols/g],
    lowrank_a [B, H, C, rows, r] / lowrank_b [B, H, C, r, cols], outlier_index / outlier_value [B, H, C, k]
    (positions in the chunk's [n, d] layout)."""
    dtype = x.dtype
    m = as_matrix(x, per_channel).float()                                 # [B, H, C, rows, cols]
    rows, cols = m.shape[-2:]
    g = spec.key_group(cols) if per_channel else spec.value_group(cols)
    if cols % g:
        raise ValueError(f"GEAR group_size={spec.group_size} must divide head_dim={cols} for values "
                         "(quantized per token in groups of channels)")
    out: dict[str, torch.Tensor] = {}

    # 1. S = Filter_s(M): outliers kept exactly; their places take their row's mean, so they no
    #    longer stretch the quantization range
    k = spec.n_outliers(rows, cols)
    if k:
        index, value = select_outliers(m, k)
        center = m.mean(-1, keepdim=True).expand_as(m).flatten(-2)
        m = m.flatten(-2).scatter(-1, index, center.gather(-1, index)).reshape(m.shape)
        if per_channel:  # stored as positions in the chunk's own [n, d] layout (token * d + channel)
            index = index % cols * rows + index // cols
        out["outlier_index"] = index.to(torch.int16 if rows * cols <= 2 ** 15 else torch.int32)
        out["outlier_value"] = value.to(dtype)

    # 2. D = Quant_b(M - S), along rows in groups of g columns
    codes, scale, low = quantize_groups(m, spec.bits, g)                 # [.., rows, cols], [.., rows, cols/g]
    out["codes"] = pack(codes.flatten(-2), spec.bits)                      # [B, H, C, rows*cols*bits/8]
    out["scale"], out["low"] = scale.to(dtype), low.to(dtype)

    # 3. L = A @ B ~= (M - S) - D: the quantization residual, rank r per head and chunk, by power
    #    iteration; taken against what decompression produces (statistics rounded to dtype)
    r = spec.effective_rank(rows, cols)
    if r:
        residual = m - dequantize(out, spec, m.shape)                     # [B, H, C, rows, cols]
        a, b = power_iteration(residual, start_matrix(cols, r, seed), spec.power_iters)
        out["lowrank_a"], out["lowrank_b"] = a.to(dtype), b.to(dtype)     # [.., rows, r], [.., r, cols]
    return out


def dequantize(state: dict, spec: GEARSpec, shape) -> torch.Tensor:
    """D: the quantized part alone, float32 in the matrix layout [B, H, C, rows, cols] (shape)."""
    codes = unpack(state["codes"], spec.bits).reshape(shape)
    return dequantize_groups(codes, state["scale"], state["low"])


def decompress(state: dict, spec: GEARSpec, per_channel: bool, shape, out: torch.Tensor | None = None) -> torch.Tensor:
    """X^ = D + A @ B, with the outliers S put back exactly, as chunks [B, H, C, n, d] (shape), written
    into ``out`` (any dtype; e.g. a view of the tensor attention reads: one pass, cast included) or
    a new float32 tensor. The math runs in float32 (bf16 elementwise math is several times slower
    on CPUs); the last addition casts into ``out``."""
    B, H, C, n, d = shape
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=state["codes"].device)
    rows, cols = (d, n) if per_channel else (n, d)
    scale = state["scale"].float().unsqueeze(-1)                          # [B, H, C, rows, cols/g, 1]
    g = cols // scale.shape[-2]
    m = unpack(state["codes"], spec.bits).view(B, H, C, rows, cols // g, g) * scale   # D - low
    if "lowrank_a" in state:                                              # + L = A @ B
        a, b = state["lowrank_a"], state["lowrank_b"]                      # [.., rows, k], [.., k, cols]
        m.view(-1, rows, cols).add_(torch.bmm(a.reshape(-1, rows, a.shape[-1]).float(),
                                              b.reshape(-1, b.shape[-2], cols).float()))
    out_m = as_matrix(out, per_channel)                                   # K^T is a transposed view of out
    torch.add(m, state["low"].float().unsqueeze(-1), out=out_m.view(B, H, C, rows, cols // g, g))  # + low
    if "outlier_index" in state:                                          # S, exactly
        out.view(B, H, C, n * d).scatter_(-1, state["outlier_index"].long(), state["outlier_value"].to(out.dtype))
    return out


def roundtrip(x: torch.Tensor, spec: GEARSpec, per_channel: bool, seed: int = 0) -> torch.Tensor:
    """compress then decompress, in x's layout and dtype (for tests and studies)."""
    return decompress(compress(x, spec, per_channel, seed), spec, per_channel, x.shape).to(x.dtype)
