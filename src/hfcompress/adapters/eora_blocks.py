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

from ..calibration import InputStats, iterate_blocks
from ..config import ConfigError


def calibration_batches(config, tokenizer=None) -> list[torch.Tensor]:
    """``config.dataset`` -> token batches ``[b, seq_len]``.

    Token windows (a LongTensor ``[n, seq]``) are used as given. Text (``None`` = the bundled
    calibration text, a file path, a list of strings, a ``datasets.Dataset``; it needs a tokenizer)
    and token streams (a list of 1-D token tensors) are cut into ``n_samples`` windows by
    :func:`~hfcompress.calibration.data.cut_windows`, ``config.window_offset`` of a spacing past the windows a quantizer
    calibrated on the same text, ``n_samples`` and ``seq_len`` saw.
    """
    from ..calibration.data import cut_windows, load_texts, token_ids, tokenize_text

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
        return list(cut_windows(stream, n, seq, config.window_offset).split(config.batch_size))
    ids = token_ids(data)
    if ids is None:
        if tokenizer is None:
            raise ConfigError("EoRAConfig.dataset is text (None means the bundled calibration text): pass "
                              "tokenizer= to compensate(), or give token ids as a LongTensor [n, seq]")
        ids = tokenize_text(tokenizer, load_texts(data))
    if ids.numel() < config.seq_len:
        raise ConfigError(f"EoRAConfig.dataset: the calibration text has {ids.numel()} tokens, fewer than "
                          f"seq_len={config.seq_len}; give more text or a smaller seq_len")
    return list(cut_windows(ids, config.n_samples, config.seq_len, config.window_offset).split(config.batch_size))


def _in_features(module: nn.Module) -> int:
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return base.in_features if hasattr(base, "in_features") else base.weight.shape[0]


@torch.no_grad()
def sequential_compensate_(model: nn.Module, targets: list[str], batches: list[torch.Tensor],
                           solve: Callable[[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                           adapter_name: str, progress: bool = False, dist="auto", folds: int = 0) -> None:
    """Fill the LoRA weights of ``targets`` (already wrapped by PEFT inside ``model``, B = 0
    so far) block by block, true-sequentially. ``solve(name, XᵀX) -> (B, A)``. ``dist``: a
    :class:`hfcompress.distributed.DistContext` (data parallel: ``XᵀX`` summed into each layer's
    owner, owners solve, ``B``/``A`` exchanged), None, or "auto" (the initialised process group's).
    ``folds`` > 0: the calibration windows are also split into that many contiguous folds and
    ``solve(name, XᵀX, [XᵀX of each fold])`` is called (cross-validation; not distributed)."""
    from ..calibration.apply import guarded
    from ..distributed import current, shard_batches
    from .eora import set_lora_

    dist = current() if dist == "auto" else dist
    n_windows = sum(b.shape[0] for b in batches)
    if folds and dist is not None:
        raise ConfigError("EoRAConfig.shrinkage='cv' (cross-validation) does not run distributed; use a fixed "
                          "shrinkage, or calibrate in one process")
    if folds and folds > n_windows:
        raise ConfigError(f"EoRAConfig.cv_folds={folds} is more than the {n_windows} "
                          "calibration windows")
    if dist is not None:
        from ..calibration.apply import job_fingerprint

        dist.same_everywhere(job_fingerprint(model, {"eora_targets": targets}, batches), "model, targets or "
                             "calibration data")
        batches = shard_batches(batches, dist.rank, dist.world)
        progress = progress and dist.rank == 0
    run_load = [0.0] * dist.world if dist is not None else None
    done: set[str] = set()
    for step in iterate_blocks(model, batches, progress=progress, desc="eora",
                               check=None if dist is None else dist.check, world=1 if dist is None else dist.world):
        mine = [t[len(step.name) + 1:] for t in targets if t.startswith(step.name + ".")]
        if not mine:
            continue
        step.linear_names = mine  # the LoRA-wrapped targets, block-relative; groups follow execution order
        for group in guarded(dist, step.sequential_groups, f"{step.name}: grouping"):
            # XᵀX with earlier groups already compensated
            if folds:
                stats, by_fold = _collect_with_folds(step, group, folds, n_windows)
                fold_solve = {f"{step.name}.{rel}": by_fold[rel] for rel in group}
                layer_solve = lambda n, xtx: solve(n, xtx, fold_solve[n])  # noqa: E731
            else:
                stats = guarded(dist, lambda: step.collect_input_stats(group), f"{step.name}: calibration forward")
                layer_solve = solve
            full = {f"{step.name}.{rel}": (step.module(rel), stats[rel]) for rel in group}
            for name, (b, a) in _solve_all(dist, full, layer_solve, adapter_name, run_load).items():
                set_lora_(full[name][0], adapter_name, b, a)
                done.add(name)
    rest = [t for t in targets if t not in done]
    if rest:  # outside the decoder blocks: one pass of the compensated model
        device = next(model.parameters()).device
        widths = {n: _in_features(model.get_submodule(n)) for n in rest}
        stats = {n: InputStats(torch.zeros(k, k, dtype=torch.float32, device=device)) for n, k in widths.items()}

        def run():
            handles = [model.get_submodule(n).register_forward_hook(
                (lambda s: lambda m, args, out: s.add_(args[0]))(stats[n])) for n in rest]
            try:
                for ids in batches:
                    model(input_ids=ids.to(device))
            finally:
                for h in handles:
                    h.remove()

        guarded(dist, run, "eora: layers outside the blocks")
        full = {n: (model.get_submodule(n), stats[n]) for n in rest}
        for name, (b, a) in _solve_all(dist, full, solve, adapter_name, run_load).items():
            set_lora_(full[name][0], adapter_name, b, a)


def _collect_with_folds(step, group: list[str], folds: int, n_windows: int):
    """``step.collect_input_stats(group)`` plus ``XᵀX`` of each of ``folds`` contiguous folds of the
    calibration windows (window ``i`` of ``n_windows`` in fold ``i * folds // n_windows``), per layer
    of ``group`` (layers reading one tensor share one list): ``(stats, {layer: [XᵀX_f [K, K] fp64]})``."""
    acc: dict[str, list[InputStats]] = {}
    rows = {}  # windows seen so far, per owning layer
    last: list = [None, None]  # (layer, input) of the hook that fired last: q/k/v read one tensor

    def make(rel):
        def pre_hook(module, args):
            x = args[0]
            if last[1] is x:
                return  # the same tensor as the previous layer's: counted there
            last[:] = [rel, x]
            if rel not in acc:
                acc[rel] = [InputStats.zeros(x.shape[-1], device=x.device) for _ in range(folds)]
                rows[rel] = 0
            x3 = x.reshape(x.shape[0], -1, x.shape[-1]) if x.ndim == 3 else x.reshape(1, -1, x.shape[-1])
            fold = [(rows[rel] + j) * folds // n_windows for j in range(x3.shape[0])]
            for f in sorted(set(fold)):
                acc[rel][f].add_(x3[[j for j, g in enumerate(fold) if g == f]])
            rows[rel] += x3.shape[0]
        return pre_hook

    handles = [step.module(rel).register_forward_pre_hook(make(rel)) for rel in group]
    try:  # registered before the engine's own hooks: they run first, before it stops the forward
        stats = step.collect_input_stats(group)
    finally:
        for h in handles:
            h.remove()
    by_fold = {}
    for rel in group:  # layers sharing one input tensor share one InputStats: and one fold list
        owner = next((o for o in acc if stats[o] is stats[rel]), None)
        if owner is None:
            raise RuntimeError(f"{step.name}.{rel}: its input was never seen by the cross-validation hooks")
        fold_xtx = [s.xtx for s in acc[owner]]
        total, xtx = sum(fold_xtx), stats[rel].xtx
        if not torch.allclose(total, xtx.to(total.dtype), rtol=1e-4, atol=1e-6 * float(xtx.diagonal().max())):
            raise RuntimeError(f"{step.name}.{rel}: the folds' XᵀX do not add up to the layer's ({rows[owner]} "
                               "windows seen); the calibration engine ran this layer differently than expected")
        by_fold[rel] = fold_xtx
    return stats, by_fold


def _solve_all(dist, layers: dict[str, tuple[nn.Module, InputStats]], solve, adapter_name: str,
               run_load) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (LoRA layer, its input stats)}`` -> ``{name: (B, A)}``: here, or by the layers'
    owners (``XᵀX`` summed into them, once per shared input; ``B``/``A`` exchanged)."""
    if dist is None:
        return {n: solve(n, s.xtx) for n, (_, s) in layers.items()}
    from ..calibration.apply import guarded
    from ..distributed import assign, eora_cost
    from ..distributed.solve import reduce_stats_

    def shape(layer):  # [N, K] of the layer compensated
        return layer.lora_B[adapter_name].weight.shape[0], layer.lora_A[adapter_name].weight.shape[1]

    owner = assign({n: eora_cost(*shape(m)) for n, (m, _) in layers.items()}, dist.world, run_load)
    shared: dict[int, list[str]] = {}  # one InputStats per input tensor (q/k/v share one)
    for n, (_, s) in layers.items():
        shared.setdefault(id(s), []).append(n)
    for names in shared.values():
        s = layers[names[0]][1]
        owners = sorted({owner[n] for n in names})
        reduce_stats_(dist, s, owners)
        if dist.rank not in owners:
            s.release_()  # sent: free this rank's partial sum
    mine = guarded(dist, lambda: {n: solve(n, s.xtx) for n, (_, s) in layers.items() if owner[n] == dist.rank},
                   "eora: solving")
    got = dist.exchange({n: {"meta": None, "tensors": {"b": b, "a": a}} for n, (b, a) in mine.items()}, "lora")
    return {n: mine[n] if n in mine else (got[n]["tensors"]["b"], got[n]["tensors"]["a"]) for n in layers}
