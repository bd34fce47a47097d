"""The v1 bit stream of int_group checkpoints, unpacked on any device (shared by the CPU and GPU
runtime layouts)."""

from __future__ import annotations

import torch


def unpack_stream(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """int32 bit streams ``[R, ceil(L/32)*bits]`` -> int64 codes ``[R, L]``. Code ``i`` of a row
    starts at bit ``i*bits`` of the row's stream; 3-bit codes may straddle two words."""
    words = packed.to(torch.int64) & 0xFFFFFFFF  # [R, W] as unsigned
    pos = torch.arange(length, dtype=torch.int64, device=packed.device) * bits  # [L] first bit of each code
    word, offset = pos // 32, pos % 32
    val = words[:, word] >> offset
    if 32 % bits:
        spill = offset + bits > 32
        nxt = torch.clamp(word + 1, max=words.shape[1] - 1)
        val = torch.where(spill, val | (words[:, nxt] << (32 - offset)), val)
    return val & ((1 << bits) - 1)
