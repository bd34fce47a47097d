"""PEFT glue: the one module that touches PEFT internals.

* LoRA on hfcompress layers: ``LoraModel._create_new_module`` is wrapped so that a plain
  ``LoraConfig`` targeting a :class:`~hfcompress.nn.QuantLinear` gets a :class:`LoraQuantLinear`
  (PEFT's own dispatch list is closed; ``_register_custom_module`` is not serialized, so
  ``PeftModel.from_pretrained`` would not find it again).
* Merging LoRA into a quantized base changes the stored integers; it is refused unless
  asked for with :func:`merge_and_requantize`.
* ``target_modules="all-linear"`` finds compressed layers of every format too (PEFT's
  helper knows only ``nn.Linear`` / ``Conv1D`` and subclasses, which is how it finds bitsandbytes
  layers), for LoRA and every other method that accepts the shorthand.
"""

from __future__ import annotations

import contextlib

import torch
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.lora.model import LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer

from hfcompress.api import requantize_
from hfcompress.formats import is_compressed

_REQUANTIZE = {"on": False}


class LoraQuantLinear(torch.nn.Module, LoraLayer):
    """LoRA over a QuantLinear base: ``y = base(x) + B(A(dropout(x))) * scaling``."""

    def __init__(self, base_layer, adapter_name: str, config, r: int = 0, lora_alpha: int = 1, **kwargs):
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        if config.use_dora:
            raise ValueError("LoRA on an hfcompress QuantLinear does not support DoRA (use_dora=True)")
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_in_out_features(self, module):
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        return base.in_features, base.out_features

    def resolve_lora_variant(self, *, config, **kwargs):
        return None

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        a = self.lora_A[adapter].weight
        b = self.lora_B[adapter].weight
        return (b.float() @ a.float()) * self.scaling[adapter]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x)
        if self.disable_adapters or self.merged:
            return result
        out_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            a, b = self.lora_A[name], self.lora_B[name]
            xa = self._cast_input_dtype(x, a.weight.dtype)
            result = result + b(a(self.lora_dropout[name](xa))) * self.scaling[name]
        return result.to(out_dtype)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        if not _REQUANTIZE["on"]:
            raise ValueError(
                "Merging LoRA into an hfcompress-quantized layer would re-quantize its weights (lossy). "
                "Call hfcompress.merge_and_requantize(peft_model) to do that explicitly, or keep the adapter "
                "unmerged, or merge into the float base model instead.")
        base = self.get_base_layer()
        names = adapter_names if adapter_names is not None else self.active_adapters
        w = base.dequantize(torch.float32)
        for name in names:
            if name in self.lora_A:
                w = w + self.get_delta_weight(name).to(w.device)
                self.merged_adapters.append(name)
        if safe_merge and not torch.isfinite(w).all():
            raise ValueError(f"NaNs detected in the merged weights of adapter(s) {names}")
        requantize_(base, w)

    def unmerge(self) -> None:
        raise ValueError("A LoRA merged into an hfcompress-quantized layer was re-quantized; it cannot be unmerged")

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def dispatch_hfcompress(target, adapter_name, config, **kwargs):
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if is_compressed(base):  # a layer of any registered format
        return LoraQuantLinear(target, adapter_name, config=config, **kwargs)
    return None


def merge_and_requantize(peft_model, **kwargs):
    """``merge_and_unload()`` for a LoRA on a quantized base: each merged layer is re-quantized
    (RTN, same bits/groups) from ``dequantize(W) + B A * scaling``. Lossy by nature."""
    with _requantize_merges():
        return peft_model.merge_and_unload(**kwargs)


@contextlib.contextmanager
def _requantize_merges():
    _REQUANTIZE["on"] = True
    try:
        yield
    finally:
        _REQUANTIZE["on"] = False


def _wrap_create_new_module() -> None:
    original = LoraModel._create_new_module
    if getattr(original, "_hfcompress", False):
        return

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        new = dispatch_hfcompress(target, adapter_name, lora_config, **kwargs)
        return new if new is not None else original(lora_config, adapter_name, target, **kwargs)

    _create_new_module._hfcompress = True
    LoraModel._create_new_module = staticmethod(_create_new_module)


# ---------------------------------------------------------------------------------------------
# Third-party PEFT methods (Compacter, MoS, L4Q, ...): extend PeftType, fill peft's mappings.
#
# peft 0.21 only registers methods whose upper-cased name is already a member of the closed
# ``PeftType`` str-Enum, so the member is added at runtime through the enum's own maps. This is
# the one place that does it; ``tests/test_peft_registration.py`` fails loudly if peft changes
# any of the internals used here.
# ---------------------------------------------------------------------------------------------

#: peft versions whose internals this section was checked against ([low, high)).
PEFT_TESTED_RANGE = ((0, 21), (0, 22))


class PeftInternalsError(RuntimeError):
    """peft no longer exposes an internal that third-party method registration relies on."""


def _peft_version() -> tuple[int, int]:
    import peft

    parts = peft.__version__.split(".")
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


def check_peft_internals() -> None:
    """Raise :class:`PeftInternalsError` naming what changed if peft's internals moved."""
    import enum

    import peft
    from peft import mapping
    from peft.utils import peft_types

    where = f"peft {peft.__version__}"
    pt = getattr(peft_types, "PeftType", None)
    if not (isinstance(pt, enum.EnumMeta) and issubclass(pt, str)):
        raise PeftInternalsError(f"{where}: peft.utils.peft_types.PeftType is no longer a str Enum")
    for attr in ("_member_map_", "_member_names_", "_value2member_map_"):
        if not hasattr(pt, attr):
            raise PeftInternalsError(f"{where}: PeftType has no {attr}; update register_peft_method_type")
    for attr in ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING",
                 "PEFT_TYPE_TO_MIXED_MODEL_MAPPING"):
        if not isinstance(getattr(mapping, attr, None), dict):
            raise PeftInternalsError(f"{where}: peft.mapping.{attr} is gone or not a dict")
    import inspect

    params = inspect.signature(peft_types.register_peft_method).parameters
    for p in ("name", "config_cls", "model_cls", "prefix"):
        if p not in params:
            raise PeftInternalsError(f"{where}: peft.utils.register_peft_method lost its {p!r} argument")
    if not (PEFT_TESTED_RANGE[0] <= _peft_version() < PEFT_TESTED_RANGE[1]):
        import warnings

        warnings.warn(f"hfcompress registers its PEFT methods through peft internals checked on peft "
                      f"{PEFT_TESTED_RANGE[0]}..<{PEFT_TESTED_RANGE[1]}; found {where}. The internals it needs "
                      "are present, but if loading adapters misbehaves, install peft>=0.21,<0.22.", stacklevel=2)


def _extend_peft_type(member: str):
    """Add ``member`` (value == name, like every built-in PeftType) to the PeftType enum; return it."""
    from peft.utils.peft_types import PeftType

    if member in PeftType._member_map_:
        return PeftType._member_map_[member]
    obj = str.__new__(PeftType, member)
    obj._name_ = member
    obj._value_ = member
    obj.__objclass__ = PeftType
    obj._sort_order_ = len(PeftType._member_names_)
    # set the class attribute first: EnumType.__setattr__ refuses names already in _member_map_
    type.__setattr__(PeftType, member, obj)
    PeftType._member_map_[member] = obj
    PeftType._member_names_.append(member)
    PeftType._value2member_map_[member] = obj
    return obj


def register_peft_method_type(name: str, config_cls, model_cls, prefix: str):
    """Make ``name`` a PEFT method like the built-in ones: ``PeftType.<NAME>`` exists, and
    ``get_peft_model`` / ``PeftModel.from_pretrained`` / ``load_adapter`` find ``config_cls``
    and ``model_cls``. Idempotent (registering the same classes again is a no-op; a class
    re-created by a module reload replaces the old one). Returns the ``PeftType`` member.

    ``prefix`` must equal ``model_cls.prefix`` and appear in every adapter attribute name.
    """
    from peft import mapping
    from peft.utils.peft_types import PeftType, register_peft_method

    if not (isinstance(name, str) and name.isidentifier() and name.islower() and not name.endswith("_")):
        raise ValueError(f"PEFT method name must be a lower-case identifier without a trailing '_', got {name!r}")
    if getattr(model_cls, "prefix", None) != prefix:
        raise ValueError(f"register_peft_method_type({name!r}): prefix {prefix!r} differs from "
                         f"{model_cls.__name__}.prefix = {getattr(model_cls, 'prefix', None)!r}; make them equal")
    check_peft_internals()
    member = name.upper()
    existing_cfg = mapping.PEFT_TYPE_TO_CONFIG_MAPPING.get(member)
    if existing_cfg is not None:
        same = existing_cfg is config_cls and mapping.PEFT_TYPE_TO_TUNER_MAPPING.get(member) is model_cls
        reloaded = (_qualname(existing_cfg) == _qualname(config_cls)
                    and _qualname(mapping.PEFT_TYPE_TO_TUNER_MAPPING.get(member)) == _qualname(model_cls))
        if not (same or reloaded):
            raise ValueError(f"PEFT method {name!r} is already registered with {_qualname(existing_cfg)}; "
                             f"refusing to replace it with {_qualname(config_cls)} (choose another name)")
        peft_type = PeftType(member)
        if not same:  # a module reload re-created the classes: point the mappings at the new ones
            mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
            mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
        return peft_type
    clash = [t for t, p in mapping.PEFT_TYPE_TO_PREFIX_MAPPING.items() if p == prefix]
    if clash:
        raise ValueError(f"register_peft_method_type({name!r}): prefix {prefix!r} is already used by {clash[0]}")
    peft_type = _extend_peft_type(member)
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)
    return peft_type


def _qualname(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}" if cls is not None else "None"


def _register_peft_methods() -> None:
    """The hfcompress PEFT methods (each package under hfcompress.adapters that defines one)."""
    from hfcompress.adapters import PEFT_METHODS

    for name, (config_cls, model_cls, prefix) in PEFT_METHODS.items():
        register_peft_method_type(name, config_cls, model_cls, prefix)


def _wrap_all_linear() -> None:
    """Wrap PEFT's ``_maybe_include_all_linear_layers`` wherever peft bound it (tuners_utils and the
    tuners that import it by name): after PEFT's own resolution, every compressed layer (any
    registered format) not inside an adapter layer and not the output embedding (PEFT's own rule
    for ``lm_head``) is added."""
    import sys

    from peft.tuners import tuners_utils
    from peft.utils import INCLUDE_LINEAR_LAYERS_SHORTHAND

    original = tuners_utils._maybe_include_all_linear_layers
    if getattr(original, "_hfcompress", False):
        return

    def _maybe_include_all_linear_layers(peft_config, model):
        targets = getattr(peft_config, "target_modules", None)
        shorthand = isinstance(targets, str) and targets.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND
        peft_config = original(peft_config, model)
        if not shorthand:
            return peft_config
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        inside_adapter = {f"{prefix}.{suffix}" for prefix, m in model.named_modules() if isinstance(m, BaseTunerLayer)
                          for suffix, _ in m.named_modules() if suffix}
        quant = {n for n, m in model.named_modules() if is_compressed(m) and m is not output}
        peft_config.target_modules = set(peft_config.target_modules) | (quant - inside_adapter)
        return peft_config

    _maybe_include_all_linear_layers._hfcompress = True
    for module in list(sys.modules.values()):
        if (getattr(module, "__name__", "").startswith("peft.")
                and getattr(module, "_maybe_include_all_linear_layers", None) is original):
            module._maybe_include_all_linear_layers = _maybe_include_all_linear_layers


def register() -> None:
    _wrap_create_new_module()
    _wrap_all_linear()
    _register_peft_methods()
