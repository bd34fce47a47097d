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
