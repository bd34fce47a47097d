"""The budget in bits, and the chosen allocation written into the model and its config."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ConfigError
from ..modules import set_submodule
from .database import LevelDatabase, header_bytes

#: bytes of a shard beyond its tensors' entries: the header length, the save identity, the format tag
SHARD_OVERHEAD = 256


def fixed_bits(model: nn.Module, db: LevelDatabase, headers: bool = False) -> int:
    """Bits of every tensor a save writes that the search does not choose (embeddings, norms,
    biases, skipped layers ...): the model's persistent tensors minus the searched weights
    (``headers``: with their safetensors header entries and the shard's own overhead)."""
    searched = {f"{name}.weight" for name in db.names}
    seen: set[int] = set()
    total = 0
    for key, t in model.state_dict().items():
        if key in searched or t.is_meta or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size() * 8 + (8 * header_bytes(key) if headers else 0)
    return total + (8 * SHARD_OVERHEAD if headers else 0)


def budget_bits(config, model: nn.Module, db: LevelDatabase) -> tuple[float, int]:
    """``(bits the searched layers may take, bits of everything else)``."""
    from .config import parse_size

    fixed = fixed_bits(model, db, headers=config.target_size is not None)
    if config.target_size is not None:
        target = parse_size(config.target_size) * 8
        if target <= fixed:
            raise ConfigError(f"quantization_config.target_size={config.target_size!r} "
                              f"({target / 8e6:.2f} MB) is smaller than the parts of the model the search does not "
                              f"compress ({fixed / 8e6:.2f} MB: embeddings, norms, layers kept in float)")
        return float(target - fixed), fixed
    n_weights = sum(k * n for k, n in db.shapes.values())
    return float(config.target_bits_per_weight * n_weights), fixed


@torch.no_grad()
def apply_allocation_(config, model: nn.Module, db: LevelDatabase, allocation: list[int]) -> None:
    """Swap each searched layer for its level's compressed layer (float level: left as it is,
    and named in ``modules_to_not_convert``); the per-module table goes into ``config``."""
    table, kept = {}, []
    weight_per_bits: dict[int, int] = {}
    for name, j in zip(db.names, allocation):
        spec = db.specs[j]
        module = model.get_submodule(name)
        if spec is None:
            kept.append(name)
            continue
        layer = db.layer(name, j, module.bias, module.weight.dtype).to(module.weight.device)
        set_submodule(model, name, layer)
        table[name] = spec
        k, n = db.shapes[name]
        weight_per_bits[spec.bits] = weight_per_bits.get(spec.bits, 0) + k * n
    config.modules_to_not_convert = sorted(set(config.modules_to_not_convert or []) | set(kept))
    config._module_specs = table
    if weight_per_bits:  # the top-level bits: the width holding the most weights (cards, titles)
        config.bits = max(weight_per_bits, key=weight_per_bits.get)
