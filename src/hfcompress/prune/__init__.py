"""Structured pruning: LoRAPrune (LoRA-guided, trained with :class:`hfcompress.LoRAPruneCallback`)
and the magnitude baseline, over GQA-aware head groups and MLP channels of Llama/Qwen2/Mistral
blocks; :func:`export` writes a physically smaller checkpoint that ``from_pretrained`` reloads."""

from .export import PRUNING_KEY, export, model_card, prune_model, pruned_layers, register
from .groups import StructuredMasks, decoder_blocks
from .importance import EMA, lora_importance, lora_merged_grad
from .magnitude import magnitude_structured
from .schedule import cubic_sparsity

__all__ = [
    "EMA",
    "PRUNING_KEY",
    "StructuredMasks",
    "cubic_sparsity",
    "decoder_blocks",
    "export",
    "lora_importance",
    "lora_merged_grad",
    "magnitude_structured",
    "model_card",
    "prune_model",
    "pruned_layers",
    "register",
]
