"""A second backend to race: torch's tinygemm int4 kernel (``aten._convert_weight_to_int4pack`` +
``aten._weight_int4pack_mm``; CUDA sm80+, 4-bit, groups 32..256, bf16 activations), the kernel
behind torchao's int4 weight-only layout. The autotuner of ``int_group_mm`` times it beside our
Triton kernels and picks it only for the shapes where it is faster.

Its weight is ``(q - 8) * s + zero`` per group, ours ``(q - z) * s``, so ``zero = (8 - z) * s``.
tinygemm holds scales and zeros in **bf16**: the stored fp16 scale is rounded (relative error up
to 2**-9, the precision of a bf16 weight), so this backend is close to, not exactly, the reference.
The preparation (codes in kernel column order, act-order permuted, ``scales_and_zeros``) is pure
torch; its math is checked on CPU against ``aten._weight_int4pack_mm_for_cpu`` (same
``scales_and_zeros`` semantics). The CUDA ops themselves run only on a GPU.
"""

from __future__ import annotations

import torch

from .gpu_layout import GpuLayout, layout_codes

GROUPS = (256, 128, 64, 32)
INNER_K_TILES = 8


def eligible(lay: GpuLayout, dtype: torch.dtype) -> bool:
    """Whether tinygemm can run this layer: 4-bit, bf16, K a multiple of 128 (whole inner K
    tiles, no padding), N a multiple of 8, sub-groups of at least 32."""
    return (lay.bits == 4 and dtype == torch.bfloat16 and lay.k % (INNER_K_TILES * 16) == 0 and lay.n % 8 == 0
            and group_size(lay) is not None)


def group_size(lay: GpuLayout) -> int | None:
    """tinygemm's group: the sub-group (per-channel layers: 256-column runs sharing the scale)."""
    return next((g for g in GROUPS if lay.sg % g == 0 and lay.k % g == 0), None)


def scales_and_zeros(lay: GpuLayout) -> torch.Tensor:
    """bf16 ``[K / g, N, 2]``: ``(s, (8 - z) * s)`` per group and output channel."""
    g = group_size(lay)
    sub = torch.arange(0, lay.k, g, device=lay.scale.device) // lay.sg  # [K/g] layout row of each group
    s = lay.scale.to(torch.float32)[sub]  # [K/g, N]
    z = lay.zero.to(torch.float32)[sub] if lay.zero is not None else torch.full_like(s, 8.0)
    return torch.stack([s, (8.0 - z) * s], dim=-1).to(torch.bfloat16).contiguous()


def codes(lay: GpuLayout) -> torch.Tensor:
    """int32 ``[N, K]`` codes in kernel column order (act-order: permuted like the activations)."""
    return layout_codes(lay)[:, :lay.k].to(torch.int32).contiguous()


def nibbles(c: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` codes -> uint8 ``[N, K/2]``: even column in the high nibble (the CUDA op's input)."""
    return ((c[:, ::2] << 4) | c[:, 1::2]).to(torch.uint8)


def prepare(lay: GpuLayout) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(packed, scales_and_zeros, group)`` for ``aten._weight_int4pack_mm`` on CUDA."""
    packed = torch.ops.aten._convert_weight_to_int4pack(nibbles(codes(lay)), INNER_K_TILES)
    return packed, scales_and_zeros(lay), group_size(lay)


def mm(x: torch.Tensor, prepared) -> torch.Tensor:
    """``x [M, K]`` bf16 (columns in kernel order) -> ``[M, N]`` bf16."""
    packed, sz, g = prepared
    return torch.ops.aten._weight_int4pack_mm(x, packed, g, sz)
