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

Both stay in the chunk's own [n, d] layout (no transposes: decompression writes straight into the
tensor attention reads). Quantization groups are views of it: values [n, d/g, g] (g channels of
one token), keys [n/g, g, d] (g tokens of one channel); the statistics reduce over the g axis.

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
    compact: bool = False      # 8-bit statistics and low-rank factors (see compress)

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
# uniform b-bit quantization in groups, codes packed into bytes

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


def grouped(x: torch.Tensor, per_channel: bool, g: int) -> torch.Tensor:
    """Chunks [..., n, d] -> their quantization groups as a view: keys (per channel)
    [..., n/g, g, d], values (per token) [..., n, d/g, g]."""
    n, d = x.shape[-2:]
    return x.view(*x.shape[:-2], n // g, g, d) if per_channel else x.view(*x.shape[:-1], d // g, g)


def group_axis(per_channel: bool) -> int:
    return -2 if per_channel else -1


def quantize_groups(x: torch.Tensor, bits: int, per_channel: bool, g: int, log_scale: bool = False,
                    int_zero: bool = False):
    """x [..., n, d] -> codes [..., n, d] uint8 and scale, low (keys [..., n/g, d], values [..., n, d/g]).
    Asymmetric min-max per group: x ~= codes * scale + low. ``log_scale``: the scale is rounded *up* to a
    power of 2**(1/8) and returned as its int8 exponent code (scale = 2**(code / 8)): each step at most 9%
    wider. ``int_zero``: low = zero * scale with an int8 ``zero`` (returned in place of low; a group whose
    low is beyond 127 steps from 0 gets a wider scale so that it fits)."""
    ax = group_axis(per_channel)
    levels = 2 ** bits - 1
    xg = grouped(x.float().contiguous(), per_channel, g)
    low, high = xg.amin(ax, keepdim=True), xg.amax(ax, keepdim=True)
    scale = ((high - low) / levels).clamp_min(1e-8)
    if int_zero:
        scale = torch.maximum(scale, low.abs() / 127)
    if log_scale:
        code = torch.ceil(torch.log2(scale) * 8).clamp_(-128, 127)
        scale = torch.exp2(code / 8)
    if int_zero:
        zero = torch.round(low / scale).clamp_(-128, 127)
        low = zero * scale
    codes = torch.round((xg - low) / scale).clamp_(0, levels)
    return (codes.reshape(x.shape).to(torch.uint8), (code.to(torch.int8) if log_scale else scale).squeeze(ax),
            (zero.to(torch.int8) if int_zero else low).squeeze(ax))


def stored_scale(state: dict) -> torch.Tensor:
    """The float32 scale of a compressed state (int8 log codes or floats)."""
    s = state["scale"]
    return torch.exp2(s.float() / 8) if s.dtype == torch.int8 else s.float()


def quantize_int8_rows(b: torch.Tensor):
    """b [..., r, d] -> (int8 codes [..., r, d], scale [..., r, 1]): symmetric, one scale per row."""
    scale = (b.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-12)
    return torch.round(b / scale).clamp_(-127, 127).to(torch.int8), scale


# ---------------------------------------------------------------------------------------------
# the three pieces

def select_outliers(x: torch.Tensor, per_channel: bool, g: int, k: int):
    """x [..., n, d] -> (index [..., k] into the flattened n*d chunk, value [..., k]): the k
    entries farthest from the mean of their quantization group."""
    xg = grouped(x, per_channel, g)
    score = (xg - xg.mean(group_axis(per_channel), keepdim=True)).abs().reshape(*x.shape[:-2], -1)
    index = score.topk(k, dim=-1, sorted=False).indices
    return index, x.reshape(*x.shape[:-2], -1).gather(-1, index)


def start_matrix(d: int, rank: int, seed: int) -> torch.Tensor:
    """The seeded Gaussian start [d, rank] of the power iteration (on CPU; one for every head and
    chunk, so a chunk compresses the same whether it arrived in a long prompt or token by token)."""
    return torch.randn(d, rank, generator=torch.Generator().manual_seed(seed))


def power_iteration(r: torch.Tensor, q: torch.Tensor, iters: int):
    """Rank-k approximation r [..., n, d] ~= a [..., n, k] @ b [..., k, d] by subspace (power)
    iteration from the start q [d, k], as in PowerSGD and the GEAR paper."""
    r = r.float()
    q = q.to(device=r.device, dtype=torch.float32).expand(*r.shape[:-2], *q.shape)  # [..., d, k]
    for _ in range(iters):
        p = torch.linalg.qr(r @ q).Q                                      # [..., n, k] orthonormal
        q = r.transpose(-1, -2) @ p                                        # [..., d, k]
    return p, q.transpose(-1, -2)                                         # a [..., n, k], b [..., k, d]


def group_size(spec: GEARSpec, per_channel: bool, n: int, d: int) -> int:
    g = spec.key_group(n) if per_channel else spec.value_group(d)
    if not per_channel and d % g:
        raise ValueError(f"GEAR group_size={spec.group_size} must divide head_dim={d} for values "
                         "(quantized per token in groups of channels)")
    return g


def compress(x: torch.Tensor, spec: GEARSpec, per_channel: bool, seed: int = 0):
    """GEAR-compress chunks x [B, H, C, n, d]: keys with per_channel=True (groups of group_size
    tokens of one channel), values with per_channel=False (groups of group_size channels of one
    token). Returns a dict of tensors, the only state the cache keeps: codes [B, H, C, n*d*bits/8]
    uint8, scale / low (keys [B, H, C, n/g, d], values [B, H, C, n, d/g]), lowrank_a [B, H, C, n, r] /
    lowrank_b [B, H, C, r, d], outlier_index / outlier_value [B, H, C, k] (positions in the n*d chunk)."""
    dtype = x.dtype
    B, H, C, n, d = x.shape
    g = group_size(spec, per_channel, n, d)
    xf = x.detach().float()   # the compressed past carries no autograd graph
    out: dict[str, torch.Tensor] = {}

    # 1. S = Filter_s(X): outliers kept exactly; their places take their group's mean, so they no
    #    longer stretch the quantization range
    k = spec.n_outliers(n, d)
    if k:
        index, value = select_outliers(xf, per_channel, g, k)
        ax = group_axis(per_channel)
        center = grouped(xf, per_channel, g).mean(ax, keepdim=True).expand_as(grouped(xf, per_channel, g))
        xf = xf.reshape(B, H, C, n * d).scatter(-1, index, center.reshape(B, H, C, n * d).gather(-1, index))
        xf = xf.reshape(B, H, C, n, d)
        out["outlier_index"] = index.to(torch.int16 if n * d <= 2 ** 15 else torch.int32)
        out["outlier_value"] = value.to(dtype)

    # 2. D = Quant_b(X - S): keys per channel, values per token, in groups of g. compact: the scale as an
    #    8-bit log code; values' zero point an int8 multiple of the scale (a token's values straddle 0;
    #    a key channel can sit far from 0, its low stays a float)
    int_zero = spec.compact and not per_channel
    codes, scale, low = quantize_groups(xf, spec.bits, per_channel, g, log_scale=spec.compact, int_zero=int_zero)
    out["codes"] = pack(codes.flatten(-2), spec.bits)                      # [B, H, C, n*d*bits/8]
    out["scale"] = scale if spec.compact else scale.to(dtype)
    out["zero" if int_zero else "low"] = low if int_zero else low.to(dtype)

    # 3. L = A @ B ~= (X - S) - D: the quantization residual, rank r per head and chunk, by power
    #    iteration; taken against what decompression produces (statistics rounded to dtype)
    r = spec.effective_rank(n, d)
    if r:
        residual = xf - decompress(dict(out, outlier_index=None), spec, per_channel, x.shape)   # float32
        a, b = power_iteration(residual, start_matrix(d, r, seed), spec.power_iters)
        if not spec.compact:
            out["lowrank_a"], out["lowrank_b"] = a.to(dtype), b.to(dtype)     # [.., n, r], [.., r, d]
            return out
        # compact: A's columns scaled to max |a| = 1 and stored as int8 (a = code / 127); B refitted to the
        # rounded A by least squares, then int8 with one scale per row
        a = torch.round(a / a.abs().amax(-2, keepdim=True).clamp_min(1e-12) * 127).clamp_(-127, 127)
        a_hat = a / 127                                                    # [.., n, r]
        gram = a_hat.transpose(-1, -2) @ a_hat + 1e-6 * torch.eye(r, device=a.device)   # [.., r, r]
        b = torch.linalg.solve(gram, a_hat.transpose(-1, -2) @ residual)    # [.., r, d]
        out["lowrank_a"] = a.to(torch.int8)
        out["lowrank_b"], b_scale = quantize_int8_rows(b)
        out["lowrank_b_scale"] = b_scale.to(dtype)                         # [.., r, 1]
    return out


def lowrank_factors(state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [.., n, r], B [.., r, d]) in float32, from float or compact (int8) storage."""
    a, b = state["lowrank_a"].float(), state["lowrank_b"].float()
    if "lowrank_b_scale" in state:
        a, b = a / 127, b * state["lowrank_b_scale"].float()
    return a, b


def decompress(state: dict, spec: GEARSpec, per_channel: bool, shape, out: torch.Tensor | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """X^ = D + A @ B, with the outliers S put back exactly, as chunks [B, H, C, n, d] (shape).
    Written into ``out`` if given (any dtype; e.g. a view of the tensor attention reads: the cast
    happens in the last addition), else returned as a new tensor of ``dtype`` (this form has no
    in-place writes, so torch.compile can fuse it). The math runs in float32 (bf16 elementwise math
    is several times slower on CPUs)."""
    B, H, C, n, d = shape
    ax = group_axis(per_channel)
    scale = stored_scale(state).unsqueeze(ax)                             # [.., n/g, 1, d] or [.., n, d/g, 1]
    g = n // scale.shape[-3] if per_channel else d // scale.shape[-2]
    x = grouped(unpack(state["codes"], spec.bits).view(shape), per_channel, g).float().mul_(scale)  # D - low, float32
    low = (state["low"].float() if "low" in state else state["zero"].float()).unsqueeze(ax)
    if "zero" in state:                                                   # compact values: low = zero * scale
        low = low * scale
    if "lowrank_a" in state:                                              # + L = A @ B
        a, b = lowrank_factors(state)                                      # [.., n, k], [.., k, d]
        x.view(-1, n, d).baddbmm_(a.reshape(-1, n, a.shape[-1]), b.reshape(-1, b.shape[-2], d))  # in place: x is ours
    has_outliers = state.get("outlier_index") is not None
    if out is None:                                                       # + low, S: functional form
        x = (x + low).to(dtype).view(B, H, C, n * d)
        if has_outliers:
            x = x.scatter(-1, state["outlier_index"].long(), state["outlier_value"].to(dtype))
        return x.view(shape)
    torch.add(x, low, out=grouped(out, per_channel, g))                   # + low, cast into out
    if has_outliers:                                                      # S, exactly
        out.view(B, H, C, n * d).scatter_(-1, state["outlier_index"].long(), state["outlier_value"].to(out.dtype))
    return out


def roundtrip(x: torch.Tensor, spec: GEARSpec, per_channel: bool, seed: int = 0) -> torch.Tensor:
    """compress then decompress, in x's layout and dtype (for tests and studies)."""
    return decompress(compress(x, spec, per_channel, seed), spec, per_channel, x.shape).to(x.dtype)
