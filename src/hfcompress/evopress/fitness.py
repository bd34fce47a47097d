"""EvoPress's fitness: KL divergence of the compressed model's next-token distribution to the
float model's, on calibration windows.

Every level of every searched layer is dequantized once (the weight exactly as the compressed
layer computes it); scoring an allocation only points each float layer's ``weight`` at the
chosen level's tensor (no copy, no re-quantization) and runs the model. The float model's
log-probabilities of every calibration window are computed once and kept (bf16).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import is_conv1d
from .database import LevelDatabase


class KLFitness:
    """``fitness(allocation, n_tokens, seed)``: mean per-token ``KL(p_float || p_allocation)``
    over ``ceil(n_tokens / seq_len)`` windows of ``pool [S, seq_len]`` drawn with ``seed``."""

    @torch.no_grad()
    def __init__(self, model: nn.Module, db: LevelDatabase, pool: torch.Tensor, batch_size: int = 4):
        self.model, self.db, self.pool, self.batch_size = model, db, pool, batch_size
        self.modules = {name: model.get_submodule(name) for name in db.names}
        self.float_weights = {name: m.weight.data for name, m in self.modules.items()}  # the tensors, not the params
        self.weights: dict[str, list[torch.Tensor]] = {}
        for name, module in self.modules.items():
            w = module.weight
            per = []
            for j, spec in enumerate(db.specs):
                if spec is None:
                    per.append(w.data)
                    continue
                q = db.layer(name, j, None, w.dtype).dequantize(w.dtype).to(w.device)  # [out, in]
                per.append(q.t().contiguous() if is_conv1d(module) else q)
            self.weights[name] = per
        self.ref = torch.cat([F.log_softmax(self._logits(self.pool[i:i + batch_size]), dim=-1).to(torch.bfloat16)
                              for i in range(0, len(pool), batch_size)])  # [S, L, V]

    def _logits(self, ids: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        return self.model(input_ids=ids.to(device)).logits.float().cpu()

    def set_(self, allocation) -> None:
        """Point every searched layer at its level's weight."""
        for (name, module), j in zip(self.modules.items(), allocation):
            module.weight.data = self.weights[name][j]

    def restore_(self) -> None:
        for name, module in self.modules.items():
            module.weight.data = self.float_weights[name]

    @torch.no_grad()
    def __call__(self, allocation, n_tokens: int, seed: int) -> float:
        n_rows = min(len(self.pool), max(1, math.ceil(n_tokens / self.pool.shape[1])))
        rows = torch.randperm(len(self.pool), generator=torch.Generator().manual_seed(seed))[:n_rows]
        self.set_(allocation)
        total, count = 0.0, 0
        for i in range(0, n_rows, self.batch_size):
            r = rows[i:i + self.batch_size]
            logp = F.log_softmax(self._logits(self.pool[r]), dim=-1)       # [b, L, V]
            ref = self.ref[r].float()                                       # [b, L, V]
            kl = (ref.exp() * (ref - logp)).sum(-1)                         # [b, L]
            total += kl.double().sum().item()
            count += kl.numel()
        self.restore_()
        return total / count


def fisher_scores(fitness: KLFitness, n_windows: int | None = None) -> list[list[float]]:
    """An additive per-layer error proxy ``[layer][level]`` for a warm start
    (``hfcompress.algorithms.evopress.proxy_allocation``): the second-order estimate of the loss a
    level adds, ``1/2 sum_i F_ii (W_level - W)_i^2``, with ``F`` the diagonal empirical Fisher of
    the float model's next-token loss (squared gradients of each window's loss, summed over the
    first ``n_windows`` windows of the pool; all of them by default). The float level scores 0."""
    model, pool = fitness.model, fitness.pool[:n_windows]
    params = {name: m.weight for name, m in fitness.modules.items()}
    was = {name: p.requires_grad for name, p in params.items()}
    others = [p for p in model.parameters() if all(p is not q for q in params.values())]
    was_others = [p.requires_grad for p in others]
    fisher = {name: torch.zeros(p.shape, dtype=torch.float32) for name, p in params.items()}
    try:
        for p in others:
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        device = next(model.parameters()).device
        with torch.enable_grad():
            for row in pool:                                                     # [T] token ids
                ids = row[None].to(device)
                logits = model(input_ids=ids).logits.float()                     # [1, T, V]
                loss = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
                grads = torch.autograd.grad(loss, list(params.values()))
                for name, g in zip(params, grads):
                    fisher[name] += g.float().cpu().pow(2)
    finally:
        for name, p in params.items():
            p.requires_grad_(was[name])
        for p, w in zip(others, was_others):
            p.requires_grad_(w)
    scores = []
    for name in fitness.modules:
        w = fitness.float_weights[name].float().cpu()
        f = fisher[name]
        scores.append([0.0 if spec is None else 0.5 * float((f * (q.float().cpu() - w).pow(2)).sum())
                       for spec, q in zip(fitness.db.specs, fitness.weights[name])])
    return scores


def single_layer_scores(fitness: KLFitness, cost, budget: float, n_tokens: int, seed: int) -> list[list[float]]:
    """Measured per-layer scores ``[layer][level]`` for a warm start: from the uniform allocation
    at the level nearest the budget, the change of ``fitness`` (KL, on the same ``n_tokens``
    tokens for every move) when one layer alone moves one level down or up; ``0`` at the uniform
    level and ``inf`` (never chosen) two or more levels away. ``2 L + 1`` evaluations."""
    from ..algorithms.evopress import allocation_cost

    n_layers, n_levels = len(cost), min(len(c) for c in cost)
    base_level = min(range(n_levels), key=lambda j: abs(allocation_cost([j] * n_layers, cost) - budget))
    base = [base_level] * n_layers
    k0 = fitness(base, n_tokens, seed)
    scores = []
    for layer in range(n_layers):
        row = [math.inf] * len(cost[layer])
        row[base_level] = 0.0
        for j in (base_level - 1, base_level + 1):
            if 0 <= j < len(row):
                moved = list(base)
                moved[layer] = j
                row[j] = fitness(moved, n_tokens, seed) - k0
        scores.append(row)
    return scores
