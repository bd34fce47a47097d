"""One transformers quantizer, ``quant_method = "hfcompress"``, for every format and algorithm.

Quantize on load: data-free algorithms (RTN) swap nn.Linear for the format's compressed layer
(asked of the format registry) on the meta model and quantize each float weight as it arrives
(:class:`QuantizeOnLoad`); calibration algorithms (GPTQ ...) load the float model and run after
loading. Pre-quantized reload builds the same layer tree from the config and loads the stored
tensors; every stored tensor is validated against the format before the model is returned.
"""

from __future__ import annotations

import torch
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer
from transformers.quantizers import register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.quantizers.quantizers_utils import get_module_from_name

from hfcompress.api import AFTER_QUANTIZE_HOOKS, dequantize_, quantize_weight
from hfcompress.config import QUANT_METHOD, HfCompressConfig
from hfcompress.convert import from_gptq
from hfcompress.formats import FormatError, is_compressed, make_layer, validate_tensors
from hfcompress.formats.registry import bind_sizes, expected_tensors
from hfcompress.modules import (
    linear_modules,
    linear_shape,
    resolve_modules_to_not_convert,
    set_submodule,
)


def _has_disk(device_map) -> bool:
    return isinstance(device_map, dict) and any(v == "disk" for v in device_map.values())


class HfCompressQuantizer(HfQuantizer):
    requires_calibration = False
    quantization_config: HfCompressConfig

    def validate_environment(self, device_map=None, **kwargs):
        if not self.pre_quantized and _has_disk(device_map):
            raise ValueError(
                "hfcompress: quantize-on-load with disk offload is not supported (the offload index would point at "
                "the float weights). Quantize with device_map on cpu/gpu, save_pretrained, then load that checkpoint "
                "with disk offload.")

    def _process_model_before_weight_loading(self, model, dtype=None, **kwargs):
        config = self.quantization_config
        if getattr(config, "pending", None) is not None:  # importing a GPTQ checkpoint (hfcompress.convert)
            self._import_dtype = dtype if isinstance(dtype, torch.dtype) else torch.get_default_dtype()
            config.source = {**(config.source or {}), "name_or_path": getattr(model, "name_or_path", None)}
            from_gptq.place_holders_(model, config, _headers(kwargs.get("checkpoint_files") or []))
            return model
        keep_fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or [])
        config.modules_to_not_convert = sorted(
            set(resolve_modules_to_not_convert(model, config.modules_to_not_convert)) | set(keep_fp32))
        if not self.pre_quantized:
            config.check_can_quantize()
        if not (self.pre_quantized or config.data_free):
            return model  # calibration algorithms quantize after the float weights are loaded
        compute_dtype = dtype if isinstance(dtype, torch.dtype) else torch.get_default_dtype()
        for name, module in linear_modules(model, config.modules_to_not_convert):
            in_features, out_features = linear_shape(module)
            try:
                q = make_layer(config.spec_for(name), in_features, out_features, module.bias is not None,
                               compute_dtype=compute_dtype, device="meta")
            except FormatError as e:
                raise FormatError(f"{name}: {e}") from None
            set_submodule(model, name, q)  # records source_conv1d
        if self.pre_quantized and kwargs.get("checkpoint_files"):
            validate_checkpoint_headers(model, kwargs["checkpoint_files"])
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        if self.pre_quantized or not self.quantization_config.data_free:
            return False
        module, tensor_name = get_module_from_name(model, param_name)
        return is_compressed(module) and tensor_name == "weight"

    def get_quantize_ops(self):
        return QuantizeOnLoad(self)

    def _process_model_after_weight_loading(self, model, **kwargs):
        config = self.quantization_config
        if getattr(config, "pending", None) is not None:
            from_gptq.convert_placeholders_(model, config, self._import_dtype)
        if self.pre_quantized:
            for name, module in model.named_modules():
                if is_compressed(module):
                    validate_tensors(module.stored_tensors(), module.spec, module.out_features, module.in_features,
                                     where=name)
        elif not config.data_free:
            config.calibrate_(model, **kwargs)
        return model

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # adapters (LoRA ...) train on top of QuantLinear

    def _dequantize(self, model, dtype=None):
        dequantize_(model)
        if isinstance(dtype, str):  # transformers passes config.dtype, a string after save_pretrained
            dtype = getattr(torch, dtype)
        if dtype is not None:
            model.to(dtype)
        return model


class QuantizeOnLoad(ConversionOps):
    """float ``<prefix>.weight`` -> the stored tensors of the module's format."""

    def __init__(self, hf_quantizer: HfCompressQuantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, full_layer_name=None, model=None, missing_keys=None, **kwargs):
        (name, value), = input_dict.items()
        value = value[0] if isinstance(value, list) else value
        prefix = name.rpartition(".")[0]
        module = model.get_submodule(prefix)
        weight = value.t() if getattr(module, "source_conv1d", False) else value
        config = self.hf_quantizer.quantization_config

        try:
            q = quantize_weight(weight, None, config, spec=module.spec)
        except ValueError as e:
            raise type(e)(f"{prefix}: {e}") from None
        return {f"{prefix}.{n}": b.to(value.device) for n, b in q.stored_tensors().items()}


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _headers(checkpoint_files) -> dict[str, dict]:
    """Tensor name -> safetensors header entry (with its file under "path"), over all shards;
    pickle files are refused before transformers unpickles anything."""
    from hfcompress.inspect import read_safetensors_header

    pickles = [str(p) for p in checkpoint_files if not str(p).endswith(".safetensors")]
    if pickles:
        raise FormatError(f"{pickles[0]}: hfcompress checkpoints are read from safetensors only (a pickle file can "
                          "run code when loaded); re-save the model with save_pretrained after `import hfcompress`")
    entries: dict[str, dict] = {}
    for path in checkpoint_files:
        for key, meta in read_safetensors_header(str(path)).items():
            entries[key] = {**meta, "path": str(path)}
    return entries


def validate_checkpoint_headers(model, checkpoint_files) -> None:
    """Check every stored tensor's shape and dtype in the safetensors headers against the format
    before anything is loaded (transformers would otherwise cast a wrong float dtype silently).
    Layers whose tensor shapes depend on the checkpoint (e.g. a number of outliers) are sized
    from the headers here, on meta."""
    entries = {k: (meta, meta["path"]) for k, meta in _headers(checkpoint_files).items()}
    for name, module in model.named_modules():
        if not is_compressed(module):
            continue
        tensors = {}
        for tname in expected_tensors(module.spec, module.out_features, module.in_features):
            found = entries.get(f"{name}.{tname}")
            if found is None:
                continue  # reported as missing by validate_tensors below
            meta, path = found
            dtype = _ST_DTYPES.get(meta["dtype"])
            if dtype is None:
                raise FormatError(f"{name}.{tname} in {path} has unsupported dtype {meta['dtype']}")
            tensors[tname] = torch.empty(meta["shape"], dtype=dtype, device="meta")
        validate_tensors(tensors, module.spec, module.out_features, module.in_features, where=name)
        sizes = bind_sizes(tensors, module.spec, module.out_features, module.in_features, where=name)
        if sizes:
            module.resize_stored_(sizes)


def attach(model, config: HfCompressConfig) -> None:
    """Make an in-memory quantized model look like one loaded with ``quantization_config``."""
    model.hf_quantizer = HfCompressQuantizer(config, pre_quantized=True)
    if hasattr(model, "config"):
        model.config.quantization_config = config
        model.config._is_quantized = True
    model.quantization_method = QUANT_METHOD


def _merge_quantization_configs(original):
    """transformers uses a checkpoint's own quantization_config over the one passed to
    ``from_pretrained`` (and refuses a different class); :class:`FromGPTQConfig` passed for a GPTQ
    checkpoint is the one exception: it takes the checkpoint's GPTQ settings and loads through
    hfcompress. Every other combination goes to transformers unchanged."""

    def merge(cls, quantization_config, quantization_config_from_args):
        if isinstance(quantization_config_from_args, from_gptq.FromGPTQConfig):
            q = quantization_config.to_dict() if hasattr(quantization_config, "to_dict") else quantization_config
            if isinstance(q, dict) and str(q.get("quant_method", "")).lower() == "gptq":
                return from_gptq.FromGPTQConfig.for_checkpoint(q)
        return original.__func__(cls, quantization_config, quantization_config_from_args)

    merge._hfcompress_original = original
    return classmethod(merge)


def _install_dtype_casts() -> None:
    """``model.half()`` / ``.float()`` / ``.bfloat16()`` of an hfcompress model do what
    ``model.to(dtype)`` does (QuantLinear layers cast their compute dtype and keep the stored
    integers and fp16 scales); transformers refuses them for every quantized model. Other models
    keep transformers' own methods."""
    from transformers import PreTrainedModel

    for name, dtype in (("half", torch.float16), ("float", torch.float32), ("bfloat16", torch.bfloat16)):
        original = PreTrainedModel.__dict__.get(name) or getattr(PreTrainedModel, name)
        if getattr(original, "_hfcompress", False):
            continue

        def cast(self, *args, _original=original, _dtype=dtype):
            if isinstance(getattr(self, "hf_quantizer", None), HfCompressQuantizer):
                return self.to(_dtype)
            return _original(self, *args)

        cast._hfcompress = True
        cast.__doc__ = original.__doc__
        setattr(PreTrainedModel, name, cast)


def register() -> None:
    """transformers' public ``register_quantization_config`` / ``register_quantizer``; they refuse a
    second registration, so an existing one is checked first (idempotent; a class re-created by a
    module reload replaces its old self)."""
    from transformers.quantizers.auto import AutoHfQuantizer

    if not hasattr(AutoHfQuantizer.merge_quantization_configs, "_hfcompress_original"):
        AutoHfQuantizer.merge_quantization_configs = _merge_quantization_configs(
            AutoHfQuantizer.__dict__["merge_quantization_configs"])
    for mapping, cls, public in ((AUTO_QUANTIZATION_CONFIG_MAPPING, HfCompressConfig, register_quantization_config),
                                 (AUTO_QUANTIZER_MAPPING, HfCompressQuantizer, register_quantizer)):
        current = mapping.get(QUANT_METHOD)
        if current is None:
            public(QUANT_METHOD)(cls)
        elif current is not cls:
            if f"{current.__module__}.{current.__qualname__}" != f"{cls.__module__}.{cls.__qualname__}":
                raise ValueError(f"quant_method {QUANT_METHOD!r} is already registered with transformers by "
                                 f"{current.__module__}.{current.__qualname__}")
            mapping[QUANT_METHOD] = cls  # the same class, re-created by a module reload
    _install_dtype_casts()
    if attach not in AFTER_QUANTIZE_HOOKS:
        AFTER_QUANTIZE_HOOKS.append(attach)
