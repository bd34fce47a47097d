"""CompacterModel: the PEFT tuner for Compacter / Compacter++."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .._shared import copy_shared_to_layers, keep_shared_once
from .config import CompacterConfig
from .layer import CompacterLayer, CompacterWrapper, init_shared

#: model_type -> (regex of attention-output modules, regex of MLP-output modules). The adapter goes
#: on the output of these modules, before dropout / residual / layer norm, as in the paper.
PLACEMENT_TARGETS: dict[str, tuple[str, str]] = {
    **{t: (r".*\.self_attn\.o_proj", r".*\.mlp\.down_proj")
       for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "granite")},
    "phi3": (r".*\.self_attn\.o_proj", r".*\.mlp\.down_proj"),
    "gpt2": (r".*\.attn\.c_proj", r".*\.mlp\.c_proj"),
    **{t: (r".*\.attention\.output\.dense", r".*\.layer\.\d+\.output\.dense") for t in ("bert", "roberta")},
    "t5": (r".*\.SelfAttention\.o", r".*\.DenseReluDense\.wo"),
}


def placement_target_modules(model_type: str | None, placement: str) -> str:
    if model_type not in PLACEMENT_TARGETS:
        raise ValueError(f"CompacterConfig.target_modules is None and there is no default placement for model_type "
                         f"{model_type!r} (known: {sorted(PLACEMENT_TARGETS)}). Pass target_modules=[names of the "
                         "attention-output and/or MLP-output linear layers].")
    attn, mlp = PLACEMENT_TARGETS[model_type]
    return mlp if placement == "pfeiffer" else f"(?:{attn})|(?:{mlp})"


class CompacterModel(BaseTuner):
    """Adds Compacter adapters to a transformers model. One shared ``S`` (n x n x n) per adapter
    name lives here (``compacter_shared``) and is referenced by every adapter layer; it is saved
    once and copied back to every layer on load."""

    prefix: str = "compacter_"
    tuner_layer_cls = CompacterLayer
    target_module_mapping: dict = {}
    uses_shared_state: bool = True

    def _pre_injection_hook(self, model: nn.Module, config: CompacterConfig, adapter_name: str) -> None:
        if "compacter_shared" not in self._modules:
            self.compacter_shared = nn.ParameterDict({})

    def _prepare_adapter_config(self, peft_config: CompacterConfig, model_config: dict) -> CompacterConfig:
        if peft_config.target_modules is None:
            peft_config.target_modules = placement_target_modules(model_config.get("model_type"),
                                                                  peft_config.placement)
        return peft_config

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if adapter_name not in self.compacter_shared:
            base = target.get_base_layer() if isinstance(target, CompacterLayer) else target
            weight = next((p for p in base.parameters() if p.is_floating_point()), None)
            device, dtype = (weight.device, weight.dtype) if weight is not None else (None, None)
            self.compacter_shared[adapter_name] = nn.Parameter(init_shared(config.n, config.shared_std(), device, dtype))
        if isinstance(target, CompacterLayer):
            target.update_layer(adapter_name, config, self.compacter_shared, where=current_key)
            return
        new = CompacterWrapper(target, adapter_name, config, self.compacter_shared, where=current_key)
        self._replace_module(parent, target_name, new, target)
        new.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    # --- shared state: saved once, copied back to every layer on load ---------------------------

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        out = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        return keep_shared_once(out, state_dict, "compacter_shared", adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        out = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        return copy_shared_to_layers(model, out, "compacter_shared", adapter_name)
