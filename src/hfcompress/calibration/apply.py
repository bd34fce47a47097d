"""Run a calibration algorithm over a model, block by block.

``quantize_blocks_(model, config, batches)`` walks the decoder blocks with
:func:`iterate_blocks`; inside each block the linear layers are quantized group by group
(q/k/v, then o, then gate/up, then down: each group calibrated on the outputs of the groups
already quantized) by the algorithm (``config.quantize_group``: GPTQ, SpQR ...), each replaced
by the compressed layer of the config's format. Linear layers outside the blocks that are not
skipped (rare: lm_head is skipped by default) get the format's data-free fallback
(``config.fallback_layer``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..algorithms.gptq import gptq
from ..formats import CompressedLinear
from ..formats.int_group import QuantLinear
from ..modules import is_conv1d, linear_modules, linear_weight, set_submodule
from .blocks import find_blocks, iterate_blocks


def gptq_group(modules: dict[str, nn.Module], H: torch.Tensor, config, where: str) -> dict[str, QuantLinear]:
    """Linear layers that read the same input (one Hessian ``H [K, K]``) -> QuantLinears.

    Their weights are stacked along out_features and quantized in one GPTQ call: rows are
    independent given ``H``, so this is exactly per-layer GPTQ, with one column loop instead of
    one per layer."""
    return gptq_layers(modules, gptq_rows(modules, H, config, where), config)


def gptq_rows(modules: dict[str, nn.Module], H: torch.Tensor, config, where: str,
              rows: slice | None = None, solve_inverse=None) -> dict[str, torch.Tensor]:
    """GPTQ of ``rows`` of the layers' stacked weights ``[sum N_i, K]`` (default: all of them):
    ``{"codes" [n, K], "scale" [n, G], "zero" [n, G] (asymmetric), "g_idx" [K] (act-order)}``.
    Rows are independent given ``H`` (the column order and ``H^-1`` are shared): the rows of a
    split, concatenated, are the rows of the whole (a distributed run splits large layers so;
    ``solve_inverse``: see :func:`~hfcompress.algorithms.gptq.inverse_hessian_cholesky`)."""
    weights = [linear_weight(m) for m in modules.values()]  # [N_i, K]
    k = weights[0].shape[1]
    spec = config.spec_for(next(iter(modules)))  # quantize_blocks_ groups layers of one spec
    stacked = torch.cat(weights)  # [sum N_i, K]
    try:
        spec.check_layer(k, where=where)
        # static groups only mean something with act-order (natural order has natural groups)
        codes, scale, zero, g_idx = gptq(stacked if rows is None else stacked[rows], H, spec, damp=config.damp,
                                         static_groups=config.static_groups and config.act_order,
                                         mse_clip=config.mse_clip, solve_inverse=solve_inverse)
    except (ValueError, RuntimeError) as e:  # torch.linalg errors are RuntimeErrors
        raise type(e)(f"{where}: {e}") from None
    out = {"codes": codes, "scale": scale}
    if zero is not None:
        out["zero"] = zero
    if g_idx is not None:
        out["g_idx"] = g_idx
    return out


def gptq_layers(modules: dict[str, nn.Module], result: dict[str, torch.Tensor], config) -> dict[str, QuantLinear]:
    """:func:`gptq_rows` of every stacked row -> one QuantLinear per layer."""
    spec = config.spec_for(next(iter(modules)))
    zero, g_idx = result.get("zero"), result.get("g_idx")
    out, row = {}, 0
    for name, m in modules.items():
        w = linear_weight(m)
        rows = slice(row, row + w.shape[0])
        row += w.shape[0]
        out[name] = QuantLinear.from_codes(result["codes"][rows], result["scale"][rows],
                                           None if zero is None else zero[rows],
                                           None if g_idx is None else g_idx.clone(),
                                           spec, bias=m.bias, compute_dtype=w.dtype)
    return out


@torch.no_grad()
def quantize_blocks_(model: nn.Module, config, batches: list[torch.Tensor], device=None, progress: bool = False,
                     load_block: Callable | None = None, release_block: Callable | None = None,
                     quantize_outside: bool = True, dist="auto") -> nn.Module:
    """Quantize every non-skipped linear layer of ``model``'s decoder blocks with the calibration
    algorithm of ``config``, in place. ``dist``: a :class:`hfcompress.distributed.DistContext`
    (data-parallel over its ranks: this rank calibrates on its share of ``batches``, every rank
    ends with the same layers), None (this process alone) or "auto" (the initialised process
    group's, if any)."""
    from ..distributed import current, shard_batches
    from ..distributed.solve import solve_group

    dist = current() if dist == "auto" else dist
    if dist is not None:
        dist.same_everywhere(job_fingerprint(model, config, batches), "model, config or calibration data")
        batches = shard_batches(batches, dist.rank, dist.world)
        progress = progress and dist.rank == 0
    run_load = [0.0] * dist.world if dist is not None else None
    skip = config.modules_to_not_convert or []
    pending: dict[str, CompressedLinear] = {}

    def swap_then_release(i, name, block):
        # QuantLinears go in only after the runner computed the block's outputs: until then the
        # float layers hold the exact dequantized weights (same values, plain matmuls)
        for rel, q in pending.items():
            set_submodule(block, rel, q)
        pending.clear()
        if release_block is not None:
            release_block(i, name, block)

    for step in iterate_blocks(model, batches, skip=skip, device=device, load_block=load_block,
                               release_block=swap_then_release, progress=progress, desc=f"{config.algorithm} blocks",
                               check=None if dist is None else dist.check, world=1 if dist is None else dist.world):
        groups = guarded(dist, lambda: step.sequential_groups() if config.true_sequential
                         else [list(step.linear_names)], f"{step.name}: grouping")
        for group in groups:
            stats = guarded(dist, lambda: step.collect_input_stats(group), f"{step.name}: calibration forward")
            units = _same_input_width(step, group)
            if dist is None:
                qs = {}
                for names in units:  # [K, K] H shared: these layers read the same tensor
                    qs.update(_quantize_names(config, step, names, stats[names[0]].hessian()))
                for rel, q in qs.items():
                    _load_dequantized_(step.module(rel), q)
            else:  # (the float layers get their dequantized weights there)
                qs = solve_group(dist, step, config, stats, units, run_load)
            pending.update(qs)
            step.mark_final(group)  # later passes over this block may replay what only these feed
            del stats
    if quantize_outside:
        prefix, _ = find_blocks(model)
        for name, module in list(linear_modules(model, skip)):
            if not name.startswith(prefix + "."):
                set_submodule(model, name, config.fallback_layer(module, name))
    return model


def job_fingerprint(model: nn.Module, config, batches: list[torch.Tensor]) -> str:
    """What every rank of a distributed run must agree on: the model's class and linear layer
    shapes, the config, the calibration windows (their shapes and a checksum of the token ids)."""
    import hashlib
    import json

    h = hashlib.sha256()
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor):
            h.update(f"{name}:{tuple(w.shape)};".encode())
    cfg = {k: v for k, v in config.to_dict().items() if k != "save_id"} if hasattr(config, "to_dict") else config
    tokens = [int(b.long().sum()) for b in batches]
    return json.dumps({"model": type(model).__name__, "layers": h.hexdigest()[:16], "config": cfg,
                       "windows": [list(b.shape) for b in batches], "token_sums": tokens}, sort_keys=True, default=str)


def guarded(dist, fn: Callable, where: str):
    """``fn()``; in a distributed run its error (or any other rank's at this point) ends every rank."""
    if dist is None:
        return fn()
    err, out = None, None
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - handed to dist.check, which raises on every rank
        err = e
    dist.check(err, where)
    return out


def _quantize_names(config, step, names: list[str], H: torch.Tensor) -> dict:
    """Block-relative ``names`` reading one input (Hessian ``H``) -> ``{name: compressed layer}``,
    layers of one spec quantized together (per-module format table)."""
    out = {}
    for same in _same_spec(config, step.name, names):
        qs = config.quantize_group({f"{step.name}.{n}": step.module(n) for n in same}, H,
                                   where=f"{step.name}.{'/'.join(same)}")
        out.update({full[len(step.name) + 1:]: q for full, q in qs.items()})
    return out


def _load_dequantized_(module: nn.Module, q: CompressedLinear) -> None:
    """Give a float nn.Linear / Conv1D the weight ``q`` computes with."""
    w = q.dequantize(module.weight.dtype).to(module.weight.device)  # [N, K]
    module.weight.data.copy_(w.t() if is_conv1d(module) else w)


def _same_spec(config, prefix: str, names: list[str]) -> list[list[str]]:
    """``names`` split into runs quantized together: layers of one spec (``config.spec_for``)."""
    runs: dict = {}
    for n in names:
        runs.setdefault(config.spec_for(f"{prefix}.{n}"), []).append(n)
    return list(runs.values())


def _same_input_width(step, group: list[str]) -> list[list[str]]:
    """A group found by shared input (q/k/v, gate/up) is quantized as one stacked matrix; without
    true-sequential grouping every layer stands alone (their inputs differ)."""
    if len(group) > 1 and group in step.sequential_groups():
        return [group]
    return [[n] for n in group]
