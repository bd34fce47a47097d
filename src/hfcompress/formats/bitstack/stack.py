"""The stack: blocks of every bitstack layer in one order, so that any prefix is a valid model.

Order (as in the paper, per bit level): every layer's first block, then the second blocks, and
so on; within one level, blocks by decreasing ``weight_gain`` (the share of its layer's
activation-scaled energy the block removes). A memory budget takes the longest prefix that fits;
every layer keeps at least its first block.

- :func:`blocks_for_budget`: per-layer block counts under a budget (bytes of every tensor of the
  model: embeddings, norms, float layers, the held blocks).
- :func:`load_under_budget`: builds the model and reads from the checkpoint only the blocks that
  fit (``safetensors`` slices: the rest is never read from disk).
- :func:`resize_`: grows (reading the next blocks from the checkpoint it was loaded from) or
  shrinks a loaded model in place; :func:`load_under_budget` binds it as ``model.resize_``.
"""

from __future__ import annotations

import json
import os
import types

import torch
from torch import nn

from ..registry import FormatError
from .layer import BitStackLinear

BLOCK_TENSORS = ("weight", "weight_u", "weight_v", "weight_gain")


def parse_budget(value) -> int:
    from ...sizes import parse_size

    return parse_size(value, "memory_budget")


def _order(layers: dict[str, tuple[int, torch.Tensor]]) -> list[tuple[str, int]]:
    """``layers``: name -> (blocks available, gains [blocks]) -> the stack ``[(name, block)]``."""
    entries = [(i, -float(g[i]), name) for name, (n, g) in layers.items() for i in range(n)]
    return [(name, i) for i, _, name in sorted(entries)]


def blocks_for_budget(layers: dict[str, tuple[int, torch.Tensor, int]], fixed_bytes: int, budget: int) -> dict[str, int]:
    """``layers``: name -> (blocks available, gains, bytes per block). Per-layer block counts of
    the longest prefix of the stack whose total (``fixed_bytes`` + blocks) fits ``budget``."""
    counts = {name: 0 for name in layers}
    total = fixed_bytes
    for name, i in _order({n: (c, g) for n, (c, g, _) in layers.items()}):
        size = layers[name][2]
        if total + size > budget:
            if i == 0:
                first = fixed_bytes + sum(b for _, _, b in layers.values())
                raise FormatError(f"memory budget {budget / 1e6:.2f} MB is below the smallest bitstack model "
                                  f"({first / 1e6:.2f} MB: every layer's first block and everything else)")
            break
        total += size
        counts[name] = i + 1
    return counts


def _block_bytes(layer: BitStackLinear) -> int:
    return layer.spec.block_bits(layer.out_features, layer.in_features) // 8


def model_bytes(model: nn.Module) -> int:
    """Bytes of every persistent tensor of ``model`` (shared tensors once)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def budget_range(model: nn.Module) -> tuple[int, int]:
    """``(smallest, largest)`` budgets in bytes for ``model`` (every block it holds): the smallest
    keeps one block per layer, the largest all of them."""
    full = model_bytes(model)
    extra = sum((m.n_blocks - 1) * _block_bytes(m) for m in _layers(model).values())
    return full - extra, full


def _layers(model: nn.Module) -> dict[str, BitStackLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, BitStackLinear)}


@torch.no_grad()
def resize_(model: nn.Module, budget) -> dict[str, int]:
    """Grow or shrink ``model``'s bitstack layers to the longest prefix of the stack that fits
    ``budget`` (bytes or a size string). Growing reads the next blocks from the checkpoint the
    model was loaded from (``load_under_budget``), or from blocks it still holds."""
    budget = parse_budget(budget)
    layers = _layers(model)
    source = getattr(model, "bitstack_source", None)
    available = {n: (source["blocks"][n] if source else m.n_blocks) for n, m in layers.items()}
    gains = {n: (source["gains"][n] if source else m.weight_gain) for n, m in layers.items()}
    held = sum(m.n_blocks * _block_bytes(m) for m in layers.values())
    fixed = model_bytes(model) - held
    counts = blocks_for_budget({n: (available[n], gains[n], _block_bytes(m)) for n, m in layers.items()}, fixed,
                               budget)
    grow = {n: c for n, c in counts.items() if c > layers[n].n_blocks}
    if grow and source is None:
        raise FormatError("resize_: growing needs the checkpoint the model was loaded from; load it with "
                          "hfcompress.formats.bitstack.load_under_budget")
    for n, c in counts.items():
        if c < layers[n].n_blocks:
            layers[n].keep_blocks_(c)
    if grow:
        _read_blocks_(source["path"], {n: (layers[n], layers[n].n_blocks, c) for n, c in grow.items()})
    return counts


def _read_blocks_(path: str, wanted: dict[str, tuple[BitStackLinear, int, int]]) -> None:
    """Append blocks ``[start, stop)`` of each layer from the checkpoint's shards (slices only)."""
    from safetensors import safe_open

    index = _tensor_files(path)
    for name, (layer, start, stop) in wanted.items():
        parts = {}
        for t in BLOCK_TENSORS:
            key = f"{name}.{t}"
            with safe_open(index[key], "pt") as f:
                parts[t] = f.get_slice(key)[start:stop]
        layer.add_blocks_(**parts)


def _tensor_files(path: str) -> dict[str, str]:
    idx = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(idx):
        with open(idx) as f:
            return {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
    from safetensors import safe_open

    single = os.path.join(path, "model.safetensors")
    with safe_open(single, "pt") as f:
        return {k: single for k in f.keys()}


def _materialize_(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Allocate (on CPU) every tensor still on meta once the checkpoint's are assigned (zero-block
    buffers, non-persistent buffers), then set non-persistent buffers as transformers does (rotary
    ``inv_freq`` ...), keeping the loaded parameters of those modules."""
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for key, t in table.items():
                if t is not None and t.is_meta:
                    new = torch.empty(t.shape, dtype=t.dtype, device="cpu")
                    table[key] = nn.Parameter(new, requires_grad=t.requires_grad) if table is module._parameters else new
    for name, module in model.named_modules():
        if module._non_persistent_buffers_set:
            model._init_weights(module)
            for pname, p in module.named_parameters(recurse=False):  # _init_weights may reset them
                key = f"{name}.{pname}" if name else pname
                if key in state:
                    p.data = state[key]


@torch.no_grad()
def load_under_budget(path: str, memory_budget, dtype: torch.dtype | None = None) -> nn.Module:
    """A bitstack checkpoint loaded with as many blocks as ``memory_budget`` allows; only those
    blocks are read from disk. The model gets ``model.resize_(budget)``."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    import hfcompress  # noqa: F401  (the config class)
    from ...config import HfCompressConfig
    from ...modules import linear_modules, linear_shape, set_submodule
    from ..registry import make_layer

    budget = parse_budget(memory_budget)
    config = AutoConfig.from_pretrained(path)
    qdict = config.quantization_config
    qcfg = HfCompressConfig.from_dict(qdict if isinstance(qdict, dict) else qdict.to_dict())
    del config.quantization_config
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with torch.device("meta"):  # no float weights are ever allocated
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    skip = qcfg.modules_to_not_convert or []
    for name, module in list(linear_modules(model, skip)):
        k, n = linear_shape(module)
        set_submodule(model, name, make_layer(qcfg.spec_for(name), k, n, module.bias is not None,
                                              compute_dtype=dtype, device="meta"))
    for layer in _layers(model).values():
        layer.resize_stored_({"blocks": 0})
    # nothing is allocated before the checkpoint's tensors are assigned (an empty model first would
    # hold the embeddings twice while they are read: peak memory above the budget)
    index = _tensor_files(path)
    layers = _layers(model)
    blocks, gains = {}, {}
    for name in layers:
        with safe_open(index[f"{name}.weight_gain"], "pt") as f:
            gains[name] = f.get_tensor(f"{name}.weight_gain")
        blocks[name] = gains[name].numel()
    # everything but the blocks, read whole
    state = {}
    block_keys = {f"{n}.{t}" for n in layers for t in BLOCK_TENSORS}
    for key, file in index.items():
        if key not in block_keys:
            with safe_open(file, "pt") as f:
                state[key] = f.get_tensor(key)
    fixed = sum(t.numel() * t.element_size() for t in state.values())
    counts = blocks_for_budget({n: (blocks[n], gains[n], _block_bytes(m)) for n, m in layers.items()}, fixed, budget)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    block_missing = {f"{n}.{t}" for n in layers for t in BLOCK_TENSORS}
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    real_missing = [k for k in missing if k not in block_missing and k not in tied]
    if real_missing or unexpected:
        raise FormatError(f"{path}: the checkpoint does not match its config (missing {real_missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    if tied:
        model.tie_weights()
    _materialize_(model, state)
    _read_blocks_(path, {n: (layers[n], 0, c) for n, c in counts.items()})
    model.bitstack_source = {"path": path, "blocks": blocks, "gains": gains}
    model.resize_ = types.MethodType(resize_, model)
    model.config.quantization_config = qcfg
    return model.eval()
