"""MoSModel: the PEFT tuner for Mixture of Shards."""

from __future__ import annotations

import math
import zlib

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .._shared import copy_shared_to_layers, keep_shared_once
from .config import MoSConfig
from .layer import MoSLayer, MoSLinear

_SHARED = ("mos_pool_A", "mos_pool_B")


def draw_indices(pool_size: int, public_rank: int, shards: int, seed: int, key: str, side: str,
                 subset_selection: bool) -> torch.Tensor:
    """This layer's shard indices [public_rank, shards], drawn once, without repetition inside the layer.
    *Subset selection*: a random subset of the pool per layer (seeded by ``seed`` and the layer's
    name, so it does not depend on the order layers are visited); otherwise the first shards."""
    need = public_rank * shards
    if not subset_selection:
        return torch.arange(need).reshape(public_rank, shards)
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(f"{key}|{side}".encode())) % 2**63)
    return torch.randperm(pool_size, generator=g)[:need].reshape(public_rank, shards)


class MoSModel(BaseTuner):
    """Adds MoS adapters. The shard pools (``mos_pool_A[adapter][str(k)]``: [N_k, k/l],
    ``mos_pool_B[adapter][str(m)]``: [N_m, m/l]) live here and are referenced by every layer;
    they are saved once and copied back to every layer on load."""

    prefix: str = "mos_"
    tuner_layer_cls = MoSLayer
    target_module_mapping: dict = {}
    uses_shared_state: bool = True

    def _prepare_adapter_config(self, peft_config: MoSConfig, model_config: dict) -> MoSConfig:
        if peft_config.target_modules is None:
            raise ValueError("MoSConfig.target_modules is required (e.g. ['q_proj', 'v_proj'] or 'all-linear')")
        return peft_config

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, MoSLayer):
            target.update_layer(adapter_name, config)
            return
        new = MoSLinear(target, adapter_name, config)
        self._replace_module(parent, target_name, new, target)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        self._build_shards_(model, adapter_name)

    @torch.no_grad()
    def _build_shards_(self, model: nn.Module, adapter_name: str) -> None:
        """Size the pools from the layers that draw from them, then give each layer its index sets."""
        config: MoSConfig = self.peft_config[adapter_name]
        for attr in _SHARED:
            if attr not in self._modules:
                setattr(self, attr, nn.ModuleDict({}))
        layers = [(n, m) for n, m in model.named_modules()
                  if isinstance(m, MoSLayer) and adapter_name in m.mos_r and adapter_name not in m.mos_index_A]
        if not layers:
            return
        rp, l = config.public_rank, config.shards_per_vector
        slots: dict[tuple[str, int], int] = {}
        for name, layer in layers:
            for side, length in (("A", layer.in_features), ("B", layer.out_features)):
                if length % l:
                    raise ValueError(f"MoS on {name}: vector length {length} ({'input' if side == 'A' else 'output'} "
                                     f"size) is not divisible by MoSConfig.shards_per_vector={l}")
                slots[side, length] = slots.get((side, length), 0) + rp * l
        weight = next((p for _, m in layers for p in m.get_base_layer().parameters() if p.is_floating_point()), None)
        device = weight.device if weight is not None else None
        # the base model's float dtype, like every adapter weight (PEFT upcasts if autocast_adapter_dtype)
        dtype = weight.dtype if weight is not None else None
        pools = {"A": nn.ParameterDict({}), "B": nn.ParameterDict({})}
        for (side, length), n_slots in sorted(slots.items()):
            size = max(rp * l, math.ceil(config.pool_ratio * n_slots))
            bound = 1 / math.sqrt(length)
            if side == "B" and config.init_weights:
                shards = torch.zeros(size, length // l, device=device)  # B starts at zero: identity adapter
            else:
                shards = torch.empty(size, length // l, device=device).uniform_(-bound, bound)
            pools[side][str(length)] = nn.Parameter(shards.to(dtype))
        self.mos_pool_A[adapter_name] = pools["A"]
        self.mos_pool_B[adapter_name] = pools["B"]
        for name, layer in layers:
            n_a = pools["A"][str(layer.in_features)].shape[0]
            n_b = pools["B"][str(layer.out_features)].shape[0]
            idx_a = draw_indices(n_a, rp, l, config.seed, name, "A", config.subset_selection)
            if config.pair_dissociation:  # A and B pick their shards independently
                idx_b = draw_indices(n_b, rp, l, config.seed, name, "B", config.subset_selection)
            else:
                idx_b = idx_a % n_b
            layer.attach_shards_(adapter_name, self.mos_pool_A, self.mos_pool_B, idx_a, idx_b)
        # PEFT's rule for a new adapter's weights (BaseTuner.inject_adapter's housekeeping, which ran before the
        # pools existed): trainable only if it is active and not loaded for inference; other adapters untouched
        trainable = adapter_name in self.active_adapters and not config.inference_mode
        for pool in pools.values():
            pool.requires_grad_(trainable)

    # --- shared state: saved once, copied back to every layer on load ---------------------------

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        out = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        for attr in _SHARED:
            out = keep_shared_once(out, state_dict, attr, adapter_name)
        return out

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        out = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        for attr in _SHARED:
            out = copy_shared_to_layers(model, out, attr, adapter_name)
        return out
