"""Block-by-block EoRA calibration on the calibration engine (:mod:`hfcompress.calibration`):
each block sees the outputs of the blocks before it *after* their compensation, so errors
are fixed where they arrive.

For each decoder block, true-sequentially inside the block: for each group of target layers
sharing one input (q/k/v, then o, then gate/up, then down), accumulate ``XᵀX`` (fp32) of
that input over the calibration batches with the earlier groups already compensated, solve
the group, write its LoRA weights. The engine then runs the compensated block and feeds its
outputs to the next block. Targets outside the decoder blocks (e.g. an ``lm_head`` that was
compressed) are solved last, from one forward pass of the fully compensated model.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..calibration import InputStats, get_calibration_batches, iterate_blocks
from ..config import ConfigError


def calibration_batches(config, tokenizer=None) -> list[torch.Tensor]:
    """``config.dataset`` -> token batches ``[b, seq_len]``.

    Token ids (a LongTensor ``[n, seq]``, or a list of 1-D token tensors cut into windows) are
    used as given; text (``None`` = the bundled calibration text, a file path, a list of
    strings, a ``datasets.Dataset``) goes through the calibration engine and needs a tokenizer.
    """
    data = config.dataset
    if isinstance(data, torch.Tensor) and data.ndim == 2:
        if data.dtype.is_floating_point:
            raise ConfigError("EoRAConfig.dataset is a float tensor; token ids must be integers")
        rows = data[: config.n_samples, : config.seq_len].long()
        return list(rows.split(config.batch_size))
    if isinstance(data, (list, tuple)) and data and all(isinstance(t, torch.Tensor) for t in data):
        stream = torch.cat([t.reshape(-1).long() for t in data])  # [T]
        seq = min(config.seq_len, stream.numel())
        n = min(config.n_samples, stream.numel() - seq + 1)
        starts = torch.linspace(0, stream.numel() - seq, n).round().long().tolist()
        return list(torch.stack([stream[s: s + seq] for s in starts]).split(config.batch_size))
    if tokenizer is None:
        raise ConfigError("EoRAConfig.dataset is text (None means the bundled calibration text): pass "
                          "tokenizer= to compensate(), or give token ids as a LongTensor [n, seq]")
    return get_calibration_batches(tokenizer, data, n_samples=config.n_samples, seq_len=config.seq_len,
                                   batch_size=config.batch_size)


def _in_features(module: nn.Module) -> int:
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return base.in_features if hasattr(base, "in_features") else base.weight.shape[0]


@torch.no_grad()
def sequential_compensate_(model: nn.Module, targets: list[str], batches: list[torch.Tensor],
                           solve: Callable[[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                           adapter_name: str, progress: bool = False) -> None:
    """Fill the LoRA weights of ``targets`` (already wrapped by PEFT inside ``model``, B = 0
    so far) block by block, true-sequentially. ``solve(name, XᵀX) -> (B, A)``."""
    from .eora import set_lora_

    done: set[str] = set()
    for step in iterate_blocks(model, batches, progress=progress, desc="eora"):
        mine = [t[len(step.name) + 1:] for t in targets if t.startswith(step.name + ".")]
        if not mine:
            continue
        step.linear_names = mine  # the LoRA-wrapped targets, block-relative; groups follow execution order
        for group in step.sequential_groups():
            stats = step.collect_input_stats(group)  # XᵀX with earlier groups already compensated
            for rel in group:
                b, a = solve(f"{step.name}.{rel}", stats[rel].xtx)
                set_lora_(step.module(rel), adapter_name, b, a)
                done.add(f"{step.name}.{rel}")
    rest = [t for t in targets if t not in done]
    if rest:  # outside the decoder blocks: one pass of the compensated model
        device = next(model.parameters()).device
        widths = {n: _in_features(model.get_submodule(n)) for n in rest}
        stats = {n: InputStats(torch.zeros(k, k, dtype=torch.float32, device=device)) for n, k in widths.items()}
        handles = [model.get_submodule(n).register_forward_hook(
            (lambda s: lambda m, args, out: s.add_(args[0]))(stats[n])) for n in rest]
        try:
            for ids in batches:
                model(input_ids=ids.to(device))
        finally:
            for h in handles:
                h.remove()
        for n in rest:
            b, a = solve(n, stats[n].xtx)
            set_lora_(model.get_submodule(n), adapter_name, b, a)
