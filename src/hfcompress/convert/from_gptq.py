"""``from_pretrained(gptq_dir, quantization_config=FromGPTQConfig())``: a GPTQ checkpoint loads
straight into hfcompress QuantLinear layers (int_group), exactly; ``save_pretrained`` then
writes an ordinary hfcompress checkpoint that records where it came from.

While loading, every linear layer that has a ``qweight`` in the checkpoint becomes a
:class:`~hfcompress.convert.gptq_to_int_group.GPTQLinear` placeholder (shapes and dtypes from the
safetensors headers, so transformers loads the tensors untouched); after loading each is
converted and replaced by a QuantLinear. Linear layers without GPTQ tensors stay float and are
listed in ``modules_to_not_convert`` so a reload builds the same model.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..config import ConfigError, HfCompressConfig, register_algorithm
from ..modules import linear_shape, set_submodule, is_linear
from ..formats import make_layer
from .gptq_to_int_group import TENSORS, ConversionError, GPTQLinear, GPTQSource, choose_spec, convert_layer


@register_algorithm
class FromGPTQConfig(HfCompressConfig):
    """Import a GPTQ checkpoint (AutoGPTQ / GPTQModel layout) into hfcompress's int_group format.

    Pass it with no arguments to ``from_pretrained`` of a GPTQ checkpoint: bits, group size,
    symmetry and act-order are read from the checkpoint. The converted model's config keeps
    ``algorithm: "from_gptq"`` and ``source`` (the GPTQ settings, checkpoint format, quantizer).
    """

    algorithm = "from_gptq"
    data_free = False
    options = {"source": ((dict,), True)}

    def __init__(self, bits: int = 4, group_size: int = 128, sym: bool = False, act_order: bool = False,
                 source: dict | None = None, modules_to_not_convert: list[str] | None = None, **kwargs):
        super().__init__(bits=bits, group_size=group_size, sym=sym, act_order=act_order,
                         modules_to_not_convert=modules_to_not_convert, source=source, **kwargs)
        #: set while a GPTQ checkpoint is being imported (never serialized)
        self.pending: GPTQSource | None = None

    @classmethod
    def for_checkpoint(cls, gptq_config: dict, name_or_path: str | None = None) -> "FromGPTQConfig":
        """The config that imports a checkpoint whose ``quantization_config`` is ``gptq_config``."""
        source = GPTQSource.from_config(dict(gptq_config))
        config = cls(bits=source.bits, group_size=source.group_size,
                     sym=source.sym, act_order=source.desc_act,
                     source={**source.to_dict(), "name_or_path": name_or_path})
        config.pending = source
        return config

    def check_can_quantize(self) -> None:
        raise ConfigError("FromGPTQConfig converts GPTQ checkpoints; this model has no GPTQ quantization_config "
                          "(quant_method 'gptq') in its config.json. Load a GPTQ checkpoint, or quantize a float "
                          "model with RTNConfig / GPTQConfig")

    def calibrate_(self, model, **kwargs):
        self.check_can_quantize()


def _st_dtype(name: str, meta: dict) -> torch.dtype:
    dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8}
    if meta["dtype"] not in dtypes:
        raise ConversionError(f"{name} has dtype {meta['dtype']}, which no GPTQ tensor uses")
    return dtypes[meta["dtype"]]


def place_holders_(model: nn.Module, config: FromGPTQConfig, headers: dict[str, dict]) -> list[str]:
    """Before loading: GPTQLinear placeholders where the checkpoint (``headers``: tensor name ->
    safetensors header entry) has ``<name>.qweight``; returns the float linear layers kept."""
    kept = []
    found = set()
    for name, module in list(model.named_modules()):
        if not is_linear(module):
            continue
        if f"{name}.qweight" not in headers:
            kept.append(name)
            continue
        in_features, out_features = linear_shape(module)
        entries = {t: (tuple(headers[f"{name}.{t}"]["shape"]), _st_dtype(f"{name}.{t}", headers[f"{name}.{t}"]))
                   for t in TENSORS if f"{name}.{t}" in headers}
        for t in ("qzeros", "scales"):
            if t not in entries:
                raise ConversionError(f"{name}.{t} is missing from the checkpoint (it has {name}.qweight)")
        set_submodule(model, name, GPTQLinear(in_features, out_features, entries))
        found.add(name)
    orphans = sorted({k.rpartition(".")[0] for k in headers if k.endswith(".qweight")} - found)
    if orphans:
        raise ConversionError(f"{orphans[0]}.qweight has no linear layer of that name in the model "
                              f"({len(orphans)} such tensor(s)); the checkpoint does not match its config.json")
    if not found:
        raise ConversionError("the checkpoint has no <layer>.qweight tensor; it is not a GPTQ checkpoint")
    config.modules_to_not_convert = sorted(kept)
    return kept


@torch.no_grad()
def convert_placeholders_(model: nn.Module, config: FromGPTQConfig, compute_dtype: torch.dtype) -> None:
    """After loading: convert every GPTQLinear and put a QuantLinear in its place."""
    source = config.pending
    holders = [(n, m) for n, m in model.named_modules() if isinstance(m, GPTQLinear)]
    layers = {}
    for name, holder in holders:
        layers[name] = convert_layer(holder.tensors(), source, holder.in_features, holder.out_features, where=name)
    spec = choose_spec(layers, source)
    for name, holder in holders:
        layer = layers.pop(name)
        try:
            spec.check_layer(holder.in_features, where=name)
        except ValueError as e:
            raise ConversionError(str(e)) from None
        q = make_layer(spec, holder.in_features, holder.out_features, layer.bias is not None,
                       compute_dtype=compute_dtype, device="cpu")
        q.load_packed(**layer.packed(spec))
        if layer.bias is not None:
            q.bias.data.copy_(layer.bias.to(compute_dtype))
        device = holder.qweight.device
        set_submodule(model, name, q.to(device) if device.type != "cpu" else q)
    config.bits, config.group_size, config.sym, config.act_order = spec.bits, spec.group_size, spec.sym, spec.act_order
    config.pending = None
    from ..hub.card_data import set_card_data

    set_card_data(model, **card_data(config.source or {}))


def card_data(source: dict) -> dict:
    """What the card of a converted checkpoint says about where it came from: the GPTQ checkpoint
    as ``base_model`` when it is a Hub id (else the base_model its own card names), the source
    format and the tool that wrote it."""
    from ..hub.base_model import _HUB_ID

    name = source.get("name_or_path")
    data = {"tags": ["gptq", "converted"]}
    base = name if name and _HUB_ID.match(name) and not os.path.exists(name) else _card_base_model(name)
    if base:
        data["base_model"] = base
    written = f", written by {', '.join(source['quantizer'])}" if source.get("quantizer") else ""
    data["description"] = (f"Converted exactly (the same dequantized weights, no re-quantization) from the GPTQ "
                           f"checkpoint `{name}` (source format `gptq`, checkpoint_format "
                           f"`{source.get('checkpoint_format')}`{written}) with hfcompress.")
    return data


def _card_base_model(directory: str | None) -> str | None:
    path = os.path.join(directory, "README.md") if directory else None
    if not path or not os.path.isfile(path):
        return None
    try:
        from huggingface_hub import ModelCard

        base = ModelCard.load(path, ignore_metadata_errors=True).data.get("base_model")
    except Exception:  # an unreadable card only loses the link
        return None
    return base if isinstance(base, str) else None
