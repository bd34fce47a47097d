"""RTN: data-free round-to-nearest onto per-group integer grids (min-max; optionally MSE-clipped)."""

from __future__ import annotations

import torch

from ..formats.int_group import IntGroupSpec
from .grid import fit_grid, quantize_to_codes


def rtn(weight: torch.Tensor, spec: IntGroupSpec, mse_clip: bool = False):
    """Quantize ``weight [N, K]``. Returns ``codes [N, K]`` (uint8), ``scale [N, G]`` (fp32,
    fp16-representable), ``zero [N, G]`` (uint8, None if symmetric), ``g_idx`` (None)."""
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
    scale, zero = fit_grid(blocks, spec.bits, spec.sym, mse_clip=mse_clip, mask=mask)
    codes = quantize_to_codes(blocks, scale, zero, spec.bits).reshape(n, n_groups * g)[:, :k]
    scale = scale.reshape(n, n_groups)
    zero = None if spec.sym else zero.reshape(n, n_groups).to(torch.uint8)
    return codes.to(torch.uint8), scale, zero, None
