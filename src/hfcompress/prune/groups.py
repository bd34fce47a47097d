"""Structured groups of Llama/Qwen2/Mistral-style decoder blocks, and masks over them.

Two kinds of groups per block:

* **attention group** ``g`` (one per key/value head, GQA-aware): query heads
  ``g*R .. (g+1)*R - 1`` (``R = num_attention_heads / num_key_value_heads``: the query heads
  that read key/value head ``g``), key/value head ``g``, and the matching ``o_proj`` input
  columns. Rows/columns of one group::

      q_proj rows, o_proj cols : [g*R*hd, (g+1)*R*hd)      k_proj, v_proj rows : [g*hd, (g+1)*hd)

  Removing whole groups keeps ``R`` fixed, so a pruned block is still a valid GQA block.
* **MLP channel** ``c``: ``gate_proj`` row ``c``, ``up_proj`` row ``c``, ``down_proj`` column ``c``.

A mask keeps or drops whole groups. It is applied by zeroing the inputs of ``o_proj`` (the
heads' outputs) and of ``down_proj`` (the channels' activations): exactly the function of the
physically smaller block that :func:`hfcompress.prune.export` writes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
#: attribute under which the masks of a model being pruned are attached to its base model
MASKS_ATTR = "_hfcompress_prune_masks"
#: model_type of an exported pruned checkpoint: this prefix + the original model_type
PRUNED_MODEL_TYPE_PREFIX = "hfcompress_pruned_"


def base_model_of(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (duck-typed ``get_base_model``), else ``model``."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _in_out(module: nn.Module) -> tuple[int, int]:
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return base.in_features, base.out_features


@dataclass
class Block:
    """One decoder block: where its projections live and the size of its groups."""

    index: int
    attn: nn.Module  # has q_proj, k_proj, v_proj, o_proj
    mlp: nn.Module  # has gate_proj, up_proj, down_proj
    head_dim: int
    q_per_kv: int  # R: query heads per key/value head
    n_kv: int  # attention groups in this block (before masking)
    intermediate: int  # MLP channels in this block (before masking)

    def module(self, name: str) -> nn.Module:
        return getattr(self.attn if name in ATTN_PROJ else self.mlp, name)


def decoder_blocks(model: nn.Module) -> list[Block]:
    """The decoder blocks of a Llama/Qwen2/Mistral-style causal LM (PEFT-wrapped or not), with
    their current (possibly already pruned) sizes. Raises ValueError for other architectures."""
    base = base_model_of(model)
    config = getattr(base, "config", None)
    model_type = str(getattr(config, "model_type", None)).removeprefix(PRUNED_MODEL_TYPE_PREFIX)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"structured pruning supports Llama/Qwen2/Mistral-style decoders (model_type in {list(SUPPORTED_MODEL_TYPES)}); "
            f"got model_type={model_type!r} ({type(base).__name__}). Its attention/MLP groups are not known to hfcompress.")
    inner = getattr(base, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(base).__name__}: expected decoder blocks at .model.layers (Llama-style); not found")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q_per_kv = config.num_attention_heads // config.num_key_value_heads
    blocks = []
    for i, layer in enumerate(layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        missing = [f"self_attn.{n}" for n in ATTN_PROJ if not hasattr(attn, n)]
        missing += [f"mlp.{n}" for n in MLP_PROJ if not hasattr(mlp, n)]
        if missing:
            raise ValueError(f"model.layers.{i}: missing {missing}; not a Llama/Qwen2/Mistral-style block")
        _, k_out = _in_out(attn.k_proj)
        _, inter = _in_out(mlp.gate_proj)
        blocks.append(Block(i, attn, mlp, head_dim, q_per_kv, k_out // head_dim, inter))
    return blocks


def n_to_prune(sparsity: float, n: int) -> int:
    """Groups to drop out of ``n`` at ``sparsity`` (nearest integer, half up); at least one kept."""
    return max(0, min(n - 1, math.floor(sparsity * n + 0.5)))


def attention_group_sums(block: Block, scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-element scores of the attention projections -> one score per group ``[n_kv]``.
    ``scores[name]`` has the weight's shape ``[out, in]``; absent projections contribute nothing."""
    g, r, hd = block.n_kv, block.q_per_kv, block.head_dim
    total = 0
    for name, s in scores.items():
        s = s.float()
        if name == "q_proj":  # [g*r*hd, H]
            total += s.sum(1).view(g, r * hd).sum(1)
        elif name in ("k_proj", "v_proj"):  # [g*hd, H]
            total += s.sum(1).view(g, hd).sum(1)
        elif name == "o_proj":  # [H, g*r*hd]
            total += s.sum(0).view(g, r * hd).sum(1)
    return total.cpu() if torch.is_tensor(total) else torch.zeros(g)


def mlp_channel_sums(block: Block, scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-element scores of the MLP projections -> one score per channel ``[I]``."""
    total = 0
    for name, s in scores.items():
        s = s.float()
        if name in ("gate_proj", "up_proj"):  # [I, H]
            total += s.sum(1)
        elif name == "down_proj":  # [H, I]
            total += s.sum(0)
    return total.cpu() if torch.is_tensor(total) else torch.zeros(block.intermediate)


class _InputMask:
    """Forward pre-hook: multiplies a module's input by a 0/1 vector over its last dimension."""

    def __init__(self, keep: torch.Tensor):
        self.keep = keep  # bool [in_features]

    def __call__(self, module, args):
        x = args[0]
        m = self.keep.to(device=x.device, dtype=x.dtype)
        return (x * m,) + tuple(args[1:])


class StructuredMasks:
    """Keep/drop masks over the attention groups and MLP channels of a model's blocks.

    ``keep_first_layers`` / ``keep_last_layers`` blocks are never pruned. Masks only ever
    drop more groups (:meth:`prune_to_` is monotone); every pruned block keeps at least one
    attention group and one MLP channel.
    """

    def __init__(self, model: nn.Module, keep_first_layers: int = 1, keep_last_layers: int = 1):
        for name, v in (("keep_first_layers", keep_first_layers), ("keep_last_layers", keep_last_layers)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        self.blocks = decoder_blocks(model)
        n = len(self.blocks)
        if keep_first_layers + keep_last_layers >= n:
            raise ValueError(f"keep_first_layers={keep_first_layers} + keep_last_layers={keep_last_layers} leaves no "
                             f"block to prune in a model with {n} blocks")
        self.keep_first_layers, self.keep_last_layers = keep_first_layers, keep_last_layers
        self.prunable = [b.index for b in self.blocks[keep_first_layers:n - keep_last_layers]]
        self.attn_keep = {i: torch.ones(self.blocks[i].n_kv, dtype=torch.bool) for i in self.prunable}
        self.mlp_keep = {i: torch.ones(self.blocks[i].intermediate, dtype=torch.bool) for i in self.prunable}
        self.sparsity = 0.0
        self.method: str | None = None  # "loraprune", "magnitude", ... (written to the checkpoint)
        self._hooks: list = []
        self._attn_hooks: dict[int, _InputMask] = {}
        self._mlp_hooks: dict[int, _InputMask] = {}

    # -- masks ----------------------------------------------------------------------------
    def o_proj_keep(self, i: int) -> torch.Tensor:
        """bool ``[n_q*hd]``: o_proj input columns kept in block ``i``."""
        b = self.blocks[i]
        return self.attn_keep[i].repeat_interleave(b.q_per_kv * b.head_dim)

    def prune_to_(self, sparsity: float, attn_scores: dict[int, torch.Tensor],
                  mlp_scores: dict[int, torch.Tensor]) -> None:
        """Drop the lowest-scoring kept groups of every prunable block until ``sparsity`` of its
        attention groups and of its MLP channels are dropped. Scores: block index -> ``[n]``."""
        for i in self.prunable:
            for keep, scores in ((self.attn_keep[i], attn_scores[i]), (self.mlp_keep[i], mlp_scores[i])):
                extra = n_to_prune(sparsity, keep.numel()) - int((~keep).sum())
                if extra <= 0:
                    continue
                s = scores.float().clone()
                s[~keep] = math.inf  # already dropped: never chosen again
                keep[torch.topk(s, extra, largest=False).indices] = False
        self.sparsity = max(self.sparsity, float(sparsity))
        self._refresh_hooks()

    # -- application ----------------------------------------------------------------------
    def install_(self, model: nn.Module) -> "StructuredMasks":
        """Mask the inputs of ``o_proj``/``down_proj`` (whatever module, LoRA-wrapped or not, sits
        there now) and attach these masks to the base model for :func:`export`."""
        self.remove_()
        for i in self.prunable:
            b = self.blocks[i]
            self._attn_hooks[i] = _InputMask(self.o_proj_keep(i))
            self._mlp_hooks[i] = _InputMask(self.mlp_keep[i].clone())
            self._hooks.append(b.attn.o_proj.register_forward_pre_hook(self._attn_hooks[i]))
            self._hooks.append(b.mlp.down_proj.register_forward_pre_hook(self._mlp_hooks[i]))
        setattr(base_model_of(model), MASKS_ATTR, self)
        return self

    def remove_(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._attn_hooks.clear()
        self._mlp_hooks.clear()

    def _refresh_hooks(self) -> None:
        for i, hook in self._attn_hooks.items():
            hook.keep = self.o_proj_keep(i)
        for i, hook in self._mlp_hooks.items():
            hook.keep = self.mlp_keep[i].clone()

    # -- reporting ------------------------------------------------------------------------
    def layer_shapes(self) -> dict[str, dict[str, int]]:
        """Per pruned block: kept heads, key/value heads and MLP channels (config.json form)."""
        out = {}
        for i in self.prunable:
            b = self.blocks[i]
            kv = int(self.attn_keep[i].sum())
            inter = int(self.mlp_keep[i].sum())
            if kv == b.n_kv and inter == b.intermediate:
                continue
            out[str(i)] = {"num_attention_heads": kv * b.q_per_kv, "num_key_value_heads": kv, "intermediate_size": inter}
        return out
