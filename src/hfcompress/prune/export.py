"""Export a structurally pruned model as a physically smaller checkpoint that a plain
``AutoModelForCausalLM.from_pretrained(out_dir)`` rebuilds (after ``import hfcompress``).

On disk (config.json), next to every field of the original config:

* ``model_type = "hfcompress_pruned_<original model_type>"`` (e.g. ``hfcompress_pruned_llama``)
  and ``architectures = ["Pruned<Llama>ForCausalLM"]``. ``import hfcompress`` registers these
  with transformers' Auto classes; the model class is the original one (a subclass) whose
  constructor resizes the pruned blocks before any weight loads. Without ``import hfcompress``
  transformers refuses the unknown model type: loading fails loudly, never silently.
* ``hfcompress_pruning``::

      {"format_version": 1, "base_model_type": "llama", "method": "loraprune",
       "target_sparsity": 0.5, "keep_first_layers": 1, "keep_last_layers": 1,
       "layers": {"1": {"num_attention_heads": 3, "num_key_value_heads": 1, "intermediate_size": 80}, ...}}

  Only pruned blocks are listed; the others keep the config's global sizes.

Composes with quantization: ``quantization_config`` is an independent key. A pruned
checkpoint quantizes on load (``from_pretrained(out_dir, quantization_config=RTNConfig())``)
or in memory (``quantize_``), and the quantized checkpoint keeps both keys: the pruned
class builds the smaller blocks, then the quantizer swaps their Linear layers.
"""

from __future__ import annotations

import copy
import json
import os

import torch
from torch import nn

from .groups import MASKS_ATTR, PRUNED_MODEL_TYPE_PREFIX, SUPPORTED_MODEL_TYPES, StructuredMasks, base_model_of

PRUNING_KEY = "hfcompress_pruning"
PRUNING_FORMAT_VERSION = 1
_LAYER_FIELDS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
#: original model_type -> (config class name, causal LM class name) in transformers
_BASES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
          "mistral": ("MistralConfig", "MistralForCausalLM")}
PRUNED_CLASSES: dict[str, tuple[type, type]] = {}


# -- loading: the smaller modules are built by the model's constructor -------------------------
def _resized(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=old.bias is not None, device=old.weight.device,
                     dtype=old.weight.dtype)


def pruned_layers(config) -> dict[int, dict[str, int]]:
    """The validated per-block shapes of ``config.hfcompress_pruning`` (block index -> sizes)."""
    info = getattr(config, PRUNING_KEY, None)
    where = f"config.json {PRUNING_KEY}"
    if not isinstance(info, dict):
        raise ValueError(f"{where} is missing or not a dict; this is not an hfcompress pruned checkpoint")
    version = info.get("format_version")
    if not isinstance(version, int) or version > PRUNING_FORMAT_VERSION:
        raise ValueError(f"{where}.format_version={version!r}: this hfcompress reads versions <= "
                         f"{PRUNING_FORMAT_VERSION}; upgrade hfcompress")
    q_per_kv = config.num_attention_heads // config.num_key_value_heads
    out = {}
    for key, shape in (info.get("layers") or {}).items():
        at = f"{where}.layers[{key!r}]"
        if not (isinstance(key, str) and key.isdigit() and int(key) < config.num_hidden_layers):
            raise ValueError(f"{at}: not a block index in [0, {config.num_hidden_layers})")
        if not isinstance(shape, dict) or set(shape) != set(_LAYER_FIELDS):
            raise ValueError(f"{at} must be a dict with exactly the fields {list(_LAYER_FIELDS)}, got {shape!r}")
        heads, kv, inter = (shape[f] for f in _LAYER_FIELDS)
        for f in _LAYER_FIELDS:
            if not isinstance(shape[f], int) or isinstance(shape[f], bool) or shape[f] < 1:
                raise ValueError(f"{at}.{f} must be an int >= 1, got {shape[f]!r}")
        if kv > config.num_key_value_heads or heads != kv * q_per_kv:
            raise ValueError(f"{at}: num_attention_heads={heads}, num_key_value_heads={kv} must keep whole GQA groups "
                             f"({q_per_kv} query heads per key/value head, at most {config.num_key_value_heads} "
                             f"key/value heads)")
        if inter > config.intermediate_size:
            raise ValueError(f"{at}.intermediate_size={inter} exceeds the config's {config.intermediate_size}")
        out[int(key)] = {"num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": inter}
    return out


def resize_blocks_(model: nn.Module, layers: dict[int, dict[str, int]]) -> None:
    """Replace the projections of the listed blocks by empty Linear layers of the pruned sizes."""
    config = model.config
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    hidden = config.hidden_size
    for i, shape in layers.items():
        attn, mlp = model.model.layers[i].self_attn, model.model.layers[i].mlp
        q_out, kv_out = shape["num_attention_heads"] * hd, shape["num_key_value_heads"] * hd
        attn.q_proj = _resized(attn.q_proj, hidden, q_out)
        attn.k_proj = _resized(attn.k_proj, hidden, kv_out)
        attn.v_proj = _resized(attn.v_proj, hidden, kv_out)
        attn.o_proj = _resized(attn.o_proj, q_out, hidden)
        inter = shape["intermediate_size"]
        mlp.gate_proj = _resized(mlp.gate_proj, hidden, inter)
        mlp.up_proj = _resized(mlp.up_proj, hidden, inter)
        mlp.down_proj = _resized(mlp.down_proj, inter, hidden)


def _make_classes(base_type: str) -> tuple[type, type]:
    import transformers

    config_name, model_name = _BASES[base_type]
    base_config, base_model = getattr(transformers, config_name), getattr(transformers, model_name)
    pruned_type = PRUNED_MODEL_TYPE_PREFIX + base_type
    config_cls = type(f"Pruned{config_name}", (base_config,), {
        "model_type": pruned_type, "__module__": __name__,
        "__doc__": f"{config_name} of a structurally pruned checkpoint: per-block sizes in `{PRUNING_KEY}`."})

    def __init__(self, config):
        base_model.__init__(self, config)
        resize_blocks_(self, pruned_layers(config))

    model_cls = type(f"Pruned{model_name}", (base_model,), {
        "config_class": config_cls, "__init__": __init__, "__module__": __name__,
        "__doc__": f"{model_name} whose pruned blocks (config `{PRUNING_KEY}`) have fewer heads/channels."})
    return config_cls, model_cls


def register() -> None:
    """Register the pruned model types with transformers' AutoConfig / AutoModelForCausalLM (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    for base_type in _BASES:
        if base_type in PRUNED_CLASSES:
            continue
        config_cls, model_cls = _make_classes(base_type)
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
        PRUNED_CLASSES[base_type] = (config_cls, model_cls)


# -- export ---------------------------------------------------------------------------------
def _masks_of(model: nn.Module, masks: StructuredMasks | None) -> StructuredMasks:
    if masks is not None:
        return masks
    found = getattr(base_model_of(model), MASKS_ATTR, None)
    if found is None:
        raise ValueError("export: this model carries no pruning masks; train it with hfcompress.LoRAPruneCallback, "
                         "call hfcompress.prune.magnitude_structured(model, sparsity), or pass masks=")
    return found


@torch.no_grad()
def _sliced_state_dict(model: nn.Module, masks: StructuredMasks) -> dict[str, torch.Tensor]:
    sd = dict(model.state_dict())
    for i in masks.prunable:
        b = masks.blocks[i]
        rows_q = masks.o_proj_keep(i)  # bool [n_q*hd]
        rows_kv = masks.attn_keep[i].repeat_interleave(b.head_dim)  # bool [n_kv*hd]
        ch = masks.mlp_keep[i]  # bool [I]
        p = f"model.layers.{i}."
        for name, rows in (("self_attn.q_proj", rows_q), ("self_attn.k_proj", rows_kv), ("self_attn.v_proj", rows_kv),
                           ("mlp.gate_proj", ch), ("mlp.up_proj", ch)):
            for t in ("weight", "bias"):
                if p + f"{name}.{t}" in sd:
                    sd[p + f"{name}.{t}"] = sd[p + f"{name}.{t}"][rows.to(sd[p + f'{name}.{t}'].device)]
        for name, cols in (("self_attn.o_proj", rows_q), ("mlp.down_proj", ch)):
            w = sd[p + f"{name}.weight"]
            sd[p + f"{name}.weight"] = w[:, cols.to(w.device)]
    return {k: v.contiguous() for k, v in sd.items()}


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def prune_model(model: nn.Module, masks: StructuredMasks | None = None) -> nn.Module:
    """A new, physically smaller model with ``masks`` applied: LoRA merged (on a copy), dropped
    heads and channels removed. Its class is the registered ``Pruned*ForCausalLM``."""
    masks = _masks_of(model, masks)
    register()
    work = copy.deepcopy(model)
    if hasattr(work, "merge_and_unload"):  # a PEFT model: fold the adapters into the weights
        work = work.merge_and_unload()
    from ..formats import is_compressed

    if any(is_compressed(m) for m in work.modules()):
        raise ValueError("export: the model is quantized; prune the float model first, then quantize the exported one")
    config = work.config
    base_type = str(config.model_type).removeprefix(PRUNED_MODEL_TYPE_PREFIX)
    if base_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"export: model_type={config.model_type!r} is not prunable (supported: {list(SUPPORTED_MODEL_TYPES)})")
    previous = getattr(config, PRUNING_KEY, None) or {}
    layers = dict(previous.get("layers") or {})
    layers.update(masks.layer_shapes())
    d = config.to_dict()
    for key in ("model_type", "architectures", "quantization_config", "transformers_version", PRUNING_KEY):
        d.pop(key, None)
    d[PRUNING_KEY] = {
        "format_version": PRUNING_FORMAT_VERSION, "base_model_type": base_type,
        "method": getattr(masks, "method", None) or "unknown", "target_sparsity": masks.sparsity,
        "keep_first_layers": masks.keep_first_layers, "keep_last_layers": masks.keep_last_layers,
        "layers": dict(sorted(layers.items(), key=lambda kv: int(kv[0]))),
    }
    config_cls, model_cls = PRUNED_CLASSES[base_type]
    new_config = config_cls(**d)
    dtype = next(work.parameters()).dtype
    device = next(work.parameters()).device
    sd = _sliced_state_dict(work, masks)
    new = model_cls(new_config).to(device=device, dtype=dtype)
    new.load_state_dict(sd, strict=True)
    if getattr(work, "generation_config", None) is not None:
        new.generation_config = copy.deepcopy(work.generation_config)
    new.eval()
    new._hfcompress_params_before = _n_params(work)
    return new


def export(model: nn.Module, out_dir: str, masks: StructuredMasks | None = None, tokenizer=None,
           **save_kwargs) -> nn.Module:
    """Merge LoRA, remove the masked heads/channels, and save a smaller checkpoint (safetensors,
    config.json, model card) to ``out_dir``. Returns the pruned in-memory model. ``model`` itself
    is not modified."""
    from ..hub import atomic_save

    new = prune_model(model, masks)

    def write(tmp):  # everything lands in a sibling folder first: out_dir is whole old or whole new
        new.save_pretrained(tmp, **save_kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        generated = os.path.join(tmp, "README.md")  # a generic card of the saver; ours replaces it
        if os.path.isfile(generated):
            os.remove(generated)

    def finish(tmp):  # after the carry-over, which kept a hand-written README.md as ORIGINAL_README.md
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card(new, getattr(new, "_hfcompress_params_before", None)))

    atomic_save(out_dir, write, finish)
    return new


def _card_metadata(config, info: dict) -> str:
    """The card's YAML: a causal LM (``pipeline_tag``), pruned and LoRA-fine-tuned from its base
    (``base_model_relation: finetune``, the Hub's relation for a trained derivative; ``base_model``
    and its license when the model was loaded from a Hub id or a card that says)."""
    from huggingface_hub import ModelCardData

    from ..hub.base_model import base_model_info

    base = base_model_info(getattr(config, "_name_or_path", None) or None)
    meta = ModelCardData(library_name="transformers", pipeline_tag="text-generation",
                         tags=["hfcompress", "structured-pruning", info["method"]], base_model=base.repo_id,
                         base_model_relation="finetune", license=base.license)
    return meta.to_yaml()


def model_card(model: nn.Module, params_before: int | None = None) -> str:
    """A model card saying what was pruned, block by block."""
    from ..hub import CARD_MARKER

    config = model.config
    info = getattr(config, PRUNING_KEY)
    after = _n_params(model)
    rows = "\n".join(
        f"| {i} | {s['num_attention_heads']}/{config.num_attention_heads} | {s['num_key_value_heads']}/"
        f"{config.num_key_value_heads} | {s['intermediate_size']}/{config.intermediate_size} |"
        for i, s in sorted(pruned_layers(config).items()))
    before = f"{params_before:,}" if params_before else "n/a"
    ratio = f" ({after / params_before:.1%} of the original)" if params_before else ""
    meta = json.dumps(info, indent=2)
    return f"""---
{_card_metadata(config, info)}
---
{CARD_MARKER}
# Structurally pruned {info['base_model_type']} model (hfcompress)

Pruned with hfcompress ({info['method']}): whole attention head groups (a key/value head with the
query heads that share it, and their o_proj columns) and MLP channels (gate/up rows with their
down_proj columns) were removed. Target sparsity {info['target_sparsity']:.0%} per pruned block;
the first {info['keep_first_layers']} and last {info['keep_last_layers']} blocks were kept whole.

Parameters: {after:,} (before pruning: {before}){ratio}.

| block | query heads | key/value heads | MLP channels |
|---|---|---|---|
{rows}

## Loading
```python
import hfcompress  # registers model_type "{config.model_type}"
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("<this folder>")
```
Without `import hfcompress`, transformers does not know model_type `{config.model_type}` and refuses
to load. The per-block sizes are in config.json under `{PRUNING_KEY}`:

```json
{meta}
```
"""
