"""Describe a saved hfcompress checkpoint (or a PEFT adapter, e.g. an EoRA compensation) from its
config and safetensors headers only (no weights are loaded)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

_DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8,
               "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8}


def read_safetensors_header(path: str) -> dict:
    """``{tensor name: {dtype, shape, data_offsets}}``; a damaged file raises
    :class:`hfcompress.integrity.CheckpointError` naming it and the problem."""
    from .integrity import read_header

    return read_header(path)[0]


@dataclass
class LayerSummary:
    name: str
    in_features: int
    out_features: int
    stored_bits: int = 0
    setting: str = ""  # format and fields of the layer's spec (shown for a per-module table)

    @property
    def bits_per_weight(self) -> float:
        return self.stored_bits / (self.in_features * self.out_features)


@dataclass
class CheckpointSummary:
    path: str
    quantization_config: dict | None
    size_bytes: int
    total_params_bits: int
    layers: list[LayerSummary] = field(default_factory=list)

    @property
    def quantized_bits_per_weight(self) -> float:
        w = sum(lay.in_features * lay.out_features for lay in self.layers)
        return sum(lay.stored_bits for lay in self.layers) / w if w else float("nan")


def summarize(path: str) -> CheckpointSummary:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path} has no config.json; is it a model directory?")
    with open(cfg_path) as f:
        config = json.load(f)
    files = sorted(fn for fn in os.listdir(path) if fn.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no .safetensors files")
    tensors: dict[str, dict] = {}
    size = 0
    for fn in files:
        fp = os.path.join(path, fn)
        size += os.path.getsize(fp)
        tensors.update(read_safetensors_header(fp))
    qcfg = config.get("quantization_config")
    summary = CheckpointSummary(path, qcfg, size, 0)
    for name, meta in tensors.items():
        bits = _DTYPE_BITS.get(meta["dtype"], 32)
        summary.total_params_bits += math.prod(meta["shape"]) * bits
    if qcfg and qcfg.get("quant_method") == "hfcompress":
        specs = _module_specs(qcfg)
        shapes = _linear_shapes(path)
        # a layer is compressed when its format's first stored tensor (int_group: ``weight``) is
        # in the checkpoint with a non-float dtype; its size is every tensor the spec lists
        for prefix, (in_f, out_f) in shapes.items():
            spec = specs(prefix)
            expected = spec.tensors(out_f, in_f)
            first = next(iter(expected))
            meta = tensors.get(f"{prefix}.{first}")
            if meta is None or meta["dtype"].startswith(("F", "BF")):
                continue  # kept in float
            lay = LayerSummary(prefix, in_f, out_f, setting=_setting(spec))
            for tname in expected:
                t = tensors.get(f"{prefix}.{tname}")
                if t is not None:
                    lay.stored_bits += math.prod(t["shape"]) * _DTYPE_BITS[t["dtype"]]
            summary.layers.append(lay)
        known = set(shapes)
        stored_names = {t for prefix in shapes for t in specs(prefix).all_tensor_names()}
        for name in tensors:
            prefix, _, tname = name.rpartition(".")
            if tname != "weight" and tname in stored_names and prefix not in known:
                raise ValueError(f"{path}: {name} belongs to no linear layer of the model in config.json")
    summary.layers.sort(key=lambda lay: lay.name)
    return summary


def _module_specs(qcfg: dict):
    """``module name -> spec`` of a config.json quantization_config (its per-module table, else
    its one spec)."""
    from .config import HfCompressConfig
    from .formats import get_format
    from .formats.table import resolve_table

    fmt = get_format(qcfg.get("format", HfCompressConfig.format_name))
    spec = fmt.spec_from_fields(qcfg)
    table = resolve_table(qcfg.get("module_formats"), fmt.name, qcfg)
    return lambda name: table.get(name, spec)


def _setting(spec) -> str:
    from .formats import get_format

    fmt = get_format(spec)
    fields = {k: getattr(spec, k) for k in fmt.spec_fields}
    bits, group = fields.pop("bits", None), fields.pop("group_size", None)
    head = f"{fmt.name} {bits}b" + (f" g{group}" if group is not None else "")
    return " ".join([head] + [k for k, v in fields.items() if v is True]
                    + [f"{k}={v}" for k, v in spec.to_dict().items() if k in fields and isinstance(v, str)])


def _linear_shapes(path: str) -> dict[str, tuple[int, int]]:
    """``{module name: (in_features, out_features)}`` of the float model, built on meta."""
    import torch
    import transformers

    from .modules import is_linear, linear_shape

    config = transformers.AutoConfig.from_pretrained(path)
    config.quantization_config = None
    del config.quantization_config
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    with torch.device("meta"):
        model = cls._from_config(config) if cls is not None else transformers.AutoModel.from_config(config)
    return {n: linear_shape(m) for n, m in model.named_modules() if is_linear(m)}


def format_summary(s: CheckpointSummary, per_layer: bool = True) -> str:
    lines = [f"checkpoint: {s.path}", f"size on disk: {s.size_bytes / 2**20:.2f} MiB"]
    q = s.quantization_config
    if not q:
        lines.append("not quantized (no quantization_config)")
        return "\n".join(lines)
    lines.append(f"quant_method: {q.get('quant_method')}  format: {q.get('format')} v{q.get('format_version')}  "
                 f"algorithm: {q.get('algorithm')}")
    fields, overhead = _spec_fields(q)
    lines.append("  ".join(f"{k}: {v}" for k, v in fields.items()))
    lines.append(f"quantized layers: {len(s.layers)}  bits per weight ({overhead} included): "
                 f"{s.quantized_bits_per_weight:.3f}")
    lines.append(f"kept in float: {q.get('modules_to_not_convert')}")
    table = bool(q.get("module_formats"))
    if table:
        lines.append(f"per-module format table: {len(q['module_formats'])} entries; settings: "
                     + ", ".join(f"{k} x{n}" for k, n in _setting_counts(s.layers)))
    if per_layer and s.layers:
        lines.append(f"{'layer':<48} {'in':>6} {'out':>6} {'bits/w':>7}" + ("  setting" if table else ""))
        for lay in s.layers:
            lines.append(f"{lay.name:<48} {lay.in_features:>6} {lay.out_features:>6} {lay.bits_per_weight:>7.3f}"
                         + (f"  {lay.setting}" if table else ""))
    return "\n".join(lines)


def _setting_counts(layers) -> list[tuple[str, int]]:
    counts: dict[str, int] = {}
    for lay in layers:
        counts[lay.setting] = counts.get(lay.setting, 0) + 1
    return sorted(counts.items())


def _spec_fields(q: dict) -> tuple[dict, str]:
    """The format's spec fields of a quantization config (as config.json has them), and what its
    stored overhead is called."""
    from .config import HfCompressConfig
    from .formats import formats

    fmt = formats().get(q.get("format", HfCompressConfig.format_name))
    if fmt is None:
        return {k: q.get(k) for k in ("bits", "group_size")}, "every stored tensor"
    return {k: q.get(k) for k in fmt.spec_fields if k in q}, fmt.spec_cls.overhead


def describe_adapter(path: str) -> str:
    """A PEFT adapter directory: method, ranks, targets, storage, and for an hfcompress
    compensation (EoRA / SVD) what it compensates and the bits per weight it adds."""
    with open(os.path.join(path, "adapter_config.json")) as f:
        cfg = json.load(f)
    files = sorted(fn for fn in os.listdir(path) if fn.endswith(".safetensors"))
    tensors = {k: v for fn in files for k, v in read_safetensors_header(os.path.join(path, fn)).items()}
    n_params = sum(math.prod(t["shape"]) for t in tensors.values())
    dtypes = sorted({t["dtype"] for t in tensors.values()})
    adapted = sum(".lora_A." in k for k in tensors)
    ranks = sorted({cfg.get("r"), *(cfg.get("rank_pattern") or {}).values()} - {None})
    lines = [f"adapter: {path}", f"peft_type: {cfg.get('peft_type')}  base model: {cfg.get('base_model_name_or_path')}",
             f"rank: {cfg.get('r')} (all ranks used: {ranks})  lora_alpha: {cfg.get('lora_alpha')}  "
             f"adapted layers: {adapted}",
             f"stored: {len(tensors)} tensors, {n_params:,} parameters, {'/'.join(dtypes)}, "
             f"{sum(os.path.getsize(os.path.join(path, fn)) for fn in files) / 2**20:.2f} MiB"]
    record = (cfg.get("auto_mapping") or {}).get("hfcompress_compensation")
    if record:
        comp = record.get("compression") or {}
        what = (f"{comp.get('algorithm')} {comp.get('bits')}-bit, group {comp.get('group_size')}"
                if comp.get("algorithm") else ", ".join(f"{k}={v}" for k, v in comp.items()))
        lines.append(f"compensation: {record.get('method')} of {record.get('compressed_model')} ({what}) toward "
                     f"{record.get('original_model')}; adds {record.get('added_bits_per_weight_fp16'):.3f} bits "
                     "per compensated weight at fp16")
    return "\n".join(lines)
