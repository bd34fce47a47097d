"""int_group packing: unsigned codes <-> little-endian int32 bit streams, and the algorithm
output (codes, scales, zeros, g_idx) -> the stored tensors."""

from __future__ import annotations

import math

import torch

from ..registry import FormatError
from .spec import SUPPORTED_BITS, ZERO_DTYPE, IntGroupSpec, packed_len  # noqa: F401  (packed_len re-exported)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes ``[..., L]`` (values < 2**bits) into int32 ``[..., ceil(L/32)*bits]``."""
    if bits not in SUPPORTED_BITS:
        raise FormatError(f"bits={bits} is not supported; choose one of {SUPPORTED_BITS}")
    *lead, length = codes.shape
    runs = math.ceil(length / 32)
    c = torch.zeros(*lead, runs * 32, dtype=torch.int64, device=codes.device)
    c[..., :length] = codes.to(torch.int64)
    if 32 % bits == 0:  # whole codes per word: word w holds codes w*per .. w*per+per-1, low bits first
        per = 32 // bits
        shifts = torch.arange(per, device=codes.device, dtype=torch.int64) * bits
        out = (c.view(*lead, runs * bits, per) << shifts).sum(-1)  # disjoint bits: the sum is the OR
        return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)
    c = c.view(*lead, runs, 32)
    # bit position of each code inside its 32*bits-bit run, then scatter into int64 words
    shifts = torch.arange(32, device=codes.device, dtype=torch.int64) * bits
    word, offset = shifts // 32, shifts % 32
    out = torch.zeros(*lead, runs, bits, dtype=torch.int64, device=codes.device)
    low = (c << offset) & 0xFFFFFFFF
    out.index_add_(-1, word, low)
    spill = offset + bits > 32  # codes straddling two words (3-bit only)
    if spill.any():
        high = c[..., spill] >> (32 - offset[spill])
        out.index_add_(-1, word[spill] + 1, high)
    out = torch.where(out >= 2**31, out - 2**32, out)
    return out.view(*lead, runs * bits).to(torch.int32)


def unpack_codes(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 ``[..., ceil(L/32)*bits]`` -> uint8 ``[..., L]``."""
    *lead, n_words = packed.shape
    runs = n_words // bits
    w = packed.to(torch.int64) & 0xFFFFFFFF
    if 32 % bits == 0:  # whole codes per word (the layout of pack_codes' fast path)
        per = 32 // bits
        shifts = torch.arange(per, device=packed.device, dtype=torch.int64) * bits
        val = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [..., words, per]
        return val.reshape(*lead, n_words * per)[..., :length].to(torch.uint8)
    w = w.view(*lead, runs, bits)
    shifts = torch.arange(32, device=packed.device, dtype=torch.int64) * bits
    word, offset = shifts // 32, shifts % 32
    val = w[..., word] >> offset
    spill = offset + bits > 32
    if 32 % bits:  # only widths that do not divide 32 straddle (a Python test: traceable, no guard)
        nxt = torch.clamp(word + 1, max=bits - 1)
        val = torch.where(spill, val | (w[..., nxt] << (32 - offset)), val)
    val = val & ((1 << bits) - 1)
    return val.reshape(*lead, runs * 32)[..., :length].to(torch.uint8)


def pack(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, g_idx: torch.Tensor | None,
         spec: IntGroupSpec) -> dict[str, torch.Tensor]:
    """Unpacked algorithm output -> the stored tensors of the int_group format."""
    out = {"weight": pack_codes(codes, spec.bits), "weight_scale": scale.to(torch.float16)}
    if not spec.sym:
        out["weight_zero"] = pack_zero(zero, spec)
    if spec.act_order:
        out["weight_g_idx"] = g_idx.to(torch.int32)
    return out


def pack_zero(zero: torch.Tensor, spec: IntGroupSpec) -> torch.Tensor:
    """Zeros ``[N, G]`` -> the stored ``weight_zero`` (``[G, N]``: fp16 for float zero points, else
    integer codes packed along N)."""
    if spec.zero_point == "float":
        return zero.t().to(ZERO_DTYPE).contiguous()
    return pack_codes(zero.t(), spec.bits)
