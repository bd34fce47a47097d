"""One transformers quantizer, ``quant_method = "hfcompress"``, for every format and algorithm.

Quantize on load: data-free algorithms (RTN) swap nn.Linear for the format's compressed layer
(asked of the format registry) on the meta model and quantize each float weight as it arrives
(:class:`QuantizeOnLoad`); calibration algorithms (GPTQ ...) load the float model and run after
loading. Pre-quantized reload builds the same layer tree from the config and loads the stored
tensors; every stored tensor is validated against the format before the model is returned.
"""

from __future__ import annotations

import os
import weakref
from typing import Callable

import torch
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer
from transformers.quantizers import register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.quantizers.quantizers_utils import get_module_from_name

from hfcompress import integrity
from hfcompress.api import AFTER_QUANTIZE_HOOKS, dequantize_, quantize_weight
from hfcompress.config import QUANT_METHOD, HfCompressConfig
from hfcompress.convert import from_gptq
from hfcompress.formats import FormatError, is_compressed, make_layer, validate_tensors
from hfcompress.formats.registry import bind_sizes, expected_tensors
from hfcompress.modules import (
    check_module_table,
    linear_modules,
    linear_shape,
    resolve_modules_to_not_convert,
    set_submodule,
)
from hfcompress.ops import label_layers


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
            set(resolve_modules_to_not_convert(model, config.modules_to_not_convert, strict=not self.pre_quantized))
            | set(keep_fp32))
        check_module_table(model, config)  # the per-module format table names converted layers only
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
            files = kwargs["checkpoint_files"]
            # disk offload reads the checkpoint files again after loading: they are not pinned then
            if all(str(p).endswith(".safetensors") for p in files) and not _has_disk(kwargs.get("device_map")):
                self._release_files = weakref.finalize(self, _pin_files_(files))
            validate_checkpoint_headers(model, files, save_id=getattr(config, "save_id", None))
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
        release = getattr(self, "_release_files", None)
        if release is not None:
            release()  # the pinned checkpoint files are loaded
        if getattr(config, "pending", None) is not None:
            from_gptq.convert_placeholders_(model, config, self._import_dtype)
        if self.pre_quantized:
            for name, module in model.named_modules():
                if is_compressed(module):
                    validate_tensors(module.stored_tensors(), module.spec, module.out_features, module.in_features,
                                     where=name)
        elif not config.data_free:
            config.calibrate_(model, **kwargs)
        label_layers(model)  # the CPU fast path names a layer it cannot serve
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


def validate_checkpoint_headers(model, checkpoint_files, save_id: str | None = None) -> None:
    """Check every stored tensor's shape and dtype in the safetensors headers against the format
    before anything is loaded (transformers would otherwise cast a wrong float dtype silently),
    and every shard's save identity against config.json's (``save_id``).
    Layers whose tensor shapes depend on the checkpoint (e.g. a number of outliers) are sized
    from the headers here, on meta."""
    pickles = [str(p) for p in checkpoint_files if not str(p).endswith(".safetensors")]
    if pickles:  # refused before transformers unpickles anything
        raise FormatError(f"{pickles[0]}: hfcompress checkpoints are read from safetensors only (a pickle file can "
                          "run code when loaded); re-save the model with save_pretrained after `import hfcompress`")
    entries: dict[str, tuple[dict, str]] = {}
    for path in checkpoint_files:
        try:
            header, metadata, _ = integrity.read_header(str(path))
        except integrity.CheckpointError as e:  # name the file the user has, not its pinned link
            raise integrity.CheckpointError(str(e).replace(str(path), _shown(path))) from None
        integrity.check_identity(_shown(path), metadata, save_id)
        for key, meta in header.items():
            entries[key] = (meta, _shown(path))
    if integrity.verify_on_load():
        problems = [p.replace(str(path), _shown(path)) for path in checkpoint_files
                    for p in integrity.verify_file(str(path), save_id)[2]]
        if problems:
            raise integrity.CheckpointError("verification at load failed:\n" + "\n".join(problems))
    stored_under: dict[str, list[str]] = {}  # module prefix -> names stored under it
    for key in entries:
        prefix, _, rest = key.rpartition(".")
        stored_under.setdefault(prefix, []).append(rest)
    for name, module in model.named_modules():
        if not is_compressed(module):
            continue
        check_stored_tensors(name, module, stored_under.get(name, []), entries)
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


def _deciding_fields(spec, tname: str, out_features: int, in_features: int) -> list[str]:
    """The boolean spec fields (config.json fields of the same name) whose other value would make
    ``tname`` appear in, or disappear from, the layer's stored tensors (e.g. ``sym``, ``act_order``)."""
    import dataclasses

    present = tname in expected_tensors(spec, out_features, in_features)
    found = []
    for f in dataclasses.fields(spec) if dataclasses.is_dataclass(spec) else ():
        value = getattr(spec, f.name)
        if not isinstance(value, bool):
            continue
        try:
            other = dataclasses.replace(spec, **{f.name: not value})
        except (ValueError, TypeError):
            continue
        if (tname in expected_tensors(other, out_features, in_features)) != present:
            found.append(f"quantization_config.{f.name}={value!r}")
    return found


def check_stored_tensors(name: str, module, stored: list[str], entries: dict) -> None:
    """Every tensor stored under a compressed layer must be one its spec expects, and every
    expected one present: a config.json edited against its tensors (``sym``, ``act_order``) is an
    error naming the tensor and the config field, not a silently different model."""
    out_f, in_f = module.out_features, module.in_features
    expected = set(expected_tensors(module.spec, out_f, in_f))
    allowed = expected | {"bias"}
    fmt = getattr(module, "format", "compressed")
    for tname in sorted(stored):
        if tname in allowed:
            continue
        path = entries[f"{name}.{tname}"][1]
        fields = _deciding_fields(module.spec, tname, out_f, in_f)
        if fields:
            raise FormatError(f"{name}.{tname} is stored in {path}, but {' and '.join(fields)} says the layer has no "
                              f"such tensor; config.json does not describe this checkpoint (edited?). Restore the "
                              "value the checkpoint was saved with")
        raise FormatError(f"{name}.{tname} is stored in {path} under a compressed layer, but it is not a tensor of "
                          f"the {fmt} format (expected {sorted(allowed)} for {module.spec})")
    for tname in sorted(expected - set(stored)):
        fields = _deciding_fields(module.spec, tname, out_f, in_f)
        if fields:
            raise FormatError(f"{name}.{tname} is missing from the checkpoint, but {' and '.join(fields)} requires "
                              "it; config.json does not describe this checkpoint (edited?). Restore the value the "
                              "checkpoint was saved with")


_PINNED: dict[str, str] = {}  # pinned path -> the path it was opened from (for error messages)


def _shown(path) -> str:
    return _PINNED.get(str(path), str(path))


def _pin_files_(checkpoint_files: list) -> Callable[[], None]:
    """Open every checkpoint file now and point ``checkpoint_files`` (in place; transformers reads
    the same list) at links to the open files, so the headers checked here and the tensors
    transformers loads come from the same files even if a save replaces the directory meanwhile.
    Returns the clean-up. Without /proc (not Linux) nothing is pinned."""
    if not os.path.isdir("/proc/self/fd"):
        return lambda: None
    from hfcompress.hub.scratch import make_scratch

    links, drop_scratch = make_scratch("load")
    handles = []
    for i, path in enumerate(checkpoint_files):
        try:
            f = open(path, "rb")
        except OSError:
            continue  # transformers reports it
        handles.append(f)
        link = os.path.join(links, str(i), os.path.basename(str(path)))
        os.makedirs(os.path.dirname(link))
        os.symlink(f"/proc/self/fd/{f.fileno()}", link)
        _PINNED[link] = str(path)
        checkpoint_files[i] = link

    def release():
        for link in list(_PINNED):
            if link.startswith(links + os.sep):
                del _PINNED[link]
        for f in handles:
            f.close()
        drop_scratch()

    return release


def attach(model, config: HfCompressConfig) -> None:
    """Make an in-memory quantized model look like one loaded with ``quantization_config``."""
    model.hf_quantizer = HfCompressQuantizer(config, pre_quantized=True)
    if hasattr(model, "config"):
        model.config.quantization_config = config
        model.config._is_quantized = True
    model.quantization_method = QUANT_METHOD
    label_layers(model)


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
