"""LoRAPrune importance: the gradient of the merged weight, estimated from LoRA alone.

A LoRA layer computes ``y = x (W + s·B A)ᵀ`` with ``W [out, in]`` frozen, ``B [out, r]`` and
``A [r, in]`` trained. One gradient step on A and B (``A - G_A``, ``B - G_B``) moves the merged
weight by ``-(G_B A + B G_A - G_B G_A)``, so

    Ĝ = G_B·A + B·G_A − G_B·G_A                       [out, in]

stands in for the full weight gradient that LoRA never materialises. The first-order
(Taylor) importance of every merged weight is

    I = |Ĝ ⊙ (W + s·B·A)|                              [out, in]

and a structured group (head group, MLP channel) scores the sum of its elements'
importance (see groups.py). Group scores are normalised per block and smoothed across steps
with an exponential moving average (``ema`` weight on the past).
"""

from __future__ import annotations

import torch


def lora_merged_grad(a: torch.Tensor, b: torch.Tensor, grad_a: torch.Tensor, grad_b: torch.Tensor) -> torch.Tensor:
    """Ĝ = G_B·A + B·G_A − G_B·G_A.  a, grad_a: [r, in]; b, grad_b: [out, r] -> [out, in] (fp32)."""
    a, b, ga, gb = (t.float() for t in (a, b, grad_a, grad_b))
    return gb @ a + b @ ga - gb @ ga


def lora_importance(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, grad_a: torch.Tensor,
                    grad_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """I = |Ĝ ⊙ (W + scaling·B·A)|.  weight: [out, in] -> [out, in] (fp32)."""
    merged = weight.float() + scaling * (b.float() @ a.float())  # [out, in]
    return (lora_merged_grad(a, b, grad_a, grad_b) * merged).abs()


def normalise(scores: torch.Tensor) -> torch.Tensor:
    """Scores of one block's groups -> a distribution (sum 1); all-zero scores stay zero."""
    total = scores.sum()
    return scores / total if total > 0 else scores


class EMA:
    """``avg <- ema·avg + (1 - ema)·new``, per key; the first value of a key is taken as is."""

    def __init__(self, ema: float = 0.9):
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {ema!r}")
        self.ema = ema
        self.avg: dict[int, torch.Tensor] = {}

    def update_(self, key: int, value: torch.Tensor) -> torch.Tensor:
        old = self.avg.get(key)
        self.avg[key] = value.clone() if old is None else self.ema * old + (1.0 - self.ema) * value
        return self.avg[key]
