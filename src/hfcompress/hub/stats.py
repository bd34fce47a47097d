"""Size statistics for the card: bits per weight with overhead, checkpoint vs original size,
from a model in memory or from a saved checkpoint's safetensors headers."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from ..formats import is_compressed


@dataclass
class SizeStats:
    quantized_layers: int
    quantized_weights: int  # number of weights held by compressed layers (every format)
    stored_bits: int  # bits of everything their format stores (codes, scales, zeros, g_idx, outliers ...)
    checkpoint_bytes: int  # every tensor of the model as saved
    original_bytes: int  # the same model with the quantized layers back in their float dtype
    original_dtype: str

    @property
    def bits_per_weight(self) -> float:
        return self.stored_bits / self.quantized_weights if self.quantized_weights else float("nan")

    @property
    def ratio(self) -> float:
        return self.checkpoint_bytes / self.original_bytes


def size_stats(model: nn.Module) -> SizeStats:
    seen: set[int] = set()
    total = 0
    for t in model.state_dict().values():  # persistent tensors: what a save writes
        if t.is_meta or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    n_layers = n_weights = bits = 0
    float_bytes = 0
    dtypes = set()
    for m in model.modules():
        if is_compressed(m):
            n_layers += 1
            n = m.in_features * m.out_features
            n_weights += n
            stored = sum(b.numel() * b.element_size() for b in m.stored_tensors().values())
            bits += 8 * stored
            float_bytes += n * torch.empty(0, dtype=m.compute_dtype).element_size() - stored
            dtypes.add(str(m.compute_dtype).removeprefix("torch."))
    return SizeStats(n_layers, n_weights, bits, total, total + float_bytes, "/".join(sorted(dtypes)) or "n/a")



def checkpoint_stats(path: str) -> tuple[dict, SizeStats]:
    """``(config.json, SizeStats)`` of a saved checkpoint, from its safetensors headers only
    (for checkpoints written without a model in memory, e.g. streamed quantization)."""
    import json

    from ..inspect import summarize

    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    summary = summarize(path)
    dtype = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "float32"), torch.float32)
    fp_bytes = torch.empty(0, dtype=dtype).element_size()
    n = sum(lay.in_features * lay.out_features for lay in summary.layers)
    stored = sum(lay.stored_bits for lay in summary.layers)
    total = summary.total_params_bits // 8
    stats = SizeStats(len(summary.layers), n, stored, total, total + n * fp_bytes - stored // 8,
                      str(dtype).removeprefix("torch."))
    return config, stats
