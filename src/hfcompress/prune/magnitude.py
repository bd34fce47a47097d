"""Baseline: one-shot magnitude-structured pruning on the same groups as LoRAPrune.

A group scores the L1 norm of its weights (q/k/v rows + o_proj columns of a head group;
gate/up rows + down_proj column of an MLP channel); per block, the lowest-scoring
``sparsity`` of head groups and of MLP channels are masked.
"""

from __future__ import annotations

import torch
from torch import nn

from .groups import ATTN_PROJ, MLP_PROJ, StructuredMasks, attention_group_sums, mlp_channel_sums


def _weight(module: nn.Module) -> torch.Tensor:
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return base.weight.detach()


@torch.no_grad()
def magnitude_structured(model: nn.Module, sparsity: float, keep_first_layers: int = 1,
                         keep_last_layers: int = 1) -> StructuredMasks:
    """Mask ``sparsity`` of the head groups and MLP channels of every prunable block of
    ``model`` (plain or PEFT-wrapped) by weight magnitude; returns the installed masks
    (export with :func:`hfcompress.prune.export`)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    masks = StructuredMasks(model, keep_first_layers, keep_last_layers)
    masks.method = "magnitude"
    attn, mlp = {}, {}
    for i in masks.prunable:
        b = masks.blocks[i]
        attn[i] = attention_group_sums(b, {n: _weight(b.module(n)).abs() for n in ATTN_PROJ})
        mlp[i] = mlp_channel_sums(b, {n: _weight(b.module(n)).abs() for n in MLP_PROJ})
    masks.install_(model)
    masks.prune_to_(sparsity, attn, mlp)
    return masks
