"""RTN: data-free round-to-nearest onto per-group grids (integer zeros: min-max, optionally
MSE-clipped; float zeros: HQQ's half-quadratic zero, optionally least-squares refined)."""

from __future__ import annotations

import torch

from ..formats.int_group import IntGroupSpec
from .grid import fit_float_grid, fit_grid, quantize_to_codes, quantize_to_codes_float_zero


def rtn(weight: torch.Tensor, spec: IntGroupSpec, mse_clip: bool = False):
    """Quantize ``weight [N, K]``. Returns ``codes [N, K]`` (uint8), ``scale [N, G]`` (fp32,
    fp16-representable), ``zero [N, G]`` (uint8; fp32 fp16-representable with
    ``spec.zero_point == "float"``; None if symmetric), ``g_idx`` (None)."""
    if spec.act_order:
        raise ValueError("RTN has no activation statistics to order columns by; use act_order=False")
    w = weight.detach().to(torch.float32)
    n, k = w.shape
    g = spec.effective_group_size(k)
    n_groups = spec.n_groups(k)
    pad = n_groups * g - k
    # [N, K] -> [N*G, g]; the ragged last group is edge-padded and masked out of the error
    wp = torch.nn.functional.pad(w, (0, pad), mode="replicate") if pad else w
    blocks = wp.reshape(n * n_groups, g)
    mask = None
    if pad:
        mask = (torch.arange(n_groups * g, device=w.device) < k).reshape(n_groups, g).repeat(n, 1)
    if spec.zero_point == "float":
        scale, zero = fit_float_grid(blocks, spec.bits, mse_clip=mse_clip, mask=mask)
        codes = quantize_to_codes_float_zero(blocks, scale, zero, spec.bits)
    else:
        scale, zero = fit_grid(blocks, spec.bits, spec.sym, mse_clip=mse_clip, mask=mask)
        codes = quantize_to_codes(blocks, scale, zero, spec.bits)
    codes = codes.reshape(n, n_groups * g)[:, :k]
    scale = scale.reshape(n, n_groups)
    if spec.sym:
        zero = None
    else:
        zero = zero.reshape(n, n_groups)
        zero = zero if spec.zero_point == "float" else zero.to(torch.uint8)
    return codes.to(torch.uint8), scale, zero, None
