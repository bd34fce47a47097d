"""GPTQ checkpoints (AutoGPTQ / GPTQModel layout, ``quant_method: "gptq"``) -> int_group, exactly.

The GPTQ layout of a linear layer ``W [N, K]`` (out_features, in_features), ``G`` groups:

==========  =======  ===============================  ==========================================
tensor      dtype    shape                            content
==========  =======  ===============================  ==========================================
qweight     int32    ``[K * bits / 32, N]``           codes ``q[k, n]`` packed along K
qzeros      int32    ``[G, N * bits / 32]``           zero points packed along N (v1: minus one)
scales      float    ``[G, N]``                       one scale per group and output channel
g_idx       int32    ``[K]``                          group of input channel ``k``
bias        float    ``[N]``                          optional
==========  =======  ===============================  ==========================================

Both packings are the same little-endian bit stream as int_group's (2/4/8-bit: ``32 / bits``
codes per word, lowest first; 3-bit: 32 codes in 3 words, codes straddling words), so the
conversion moves integers and never rounds anything::

    W[n, k] = scales[g, n] * (q[k, n] - z[g, n]),  g = g_idx[k]     (GPTQModel's dequantize)
            = weight_scale[n, g] * (codes[n, k] - zero[n, g])        (int_group, same numbers)

Zero points: ``checkpoint_format: "gptq"`` (v1, AutoGPTQ's convention, GPTQModel's default on
save) stores ``z - 1``; GPTQModel's loader turns it back by adding ``0b0001...0001`` to each
packed int32 word for 2/4/8 bits (carries included: the exact inverse of its own save, which
subtracts the same word) and by ``(z + 1) mod 2**bits`` per field for 3 bits. ``"gptq_v2"``
stores ``z``. Planar layouts (``gptq_p``, 5/6/7-bit), Marlin / AWQ / other formats, non-int32
packing and per-module ``dynamic`` overrides are refused by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..formats.int_group import IntGroupSpec, pack, unpack_codes

SOURCE_FORMAT = "gptq"
SUPPORTED_BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
TENSORS = ("qweight", "qzeros", "scales", "g_idx", "bias")
#: v1 -> v2 zero-point correction per packed int32 word (GPTQModel's convert_gptq_v1_to_v2_format_module)
_V1_WORD_OFFSET = {2: 0b01010101010101010101010101010101, 4: 0b00010001000100010001000100010001,
                   8: 0b00000001000000010000000100000001}


class ConversionError(ValueError):
    """A GPTQ checkpoint (config field or tensor) that cannot be converted exactly; says which and why."""


@dataclass(frozen=True)
class GPTQSource:
    """What the checkpoint's ``quantization_config`` says about its storage."""

    bits: int
    group_size: int
    sym: bool
    desc_act: bool
    checkpoint_format: str  # "gptq" (v1 zero points) or "gptq_v2"
    quantizer: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, q: dict, where: str = "quantization_config") -> "GPTQSource":
        if not isinstance(q, dict):
            raise ConversionError(f"{where} must be a dict, got {type(q).__name__}")
        method = str(q.get("quant_method", "gptq")).lower()
        if method != "gptq":
            raise ConversionError(f"{where}.quant_method={q.get('quant_method')!r}: only GPTQ checkpoints "
                                  "(quant_method 'gptq') can be imported")
        fmt = str(q.get("checkpoint_format") or q.get("format") or "gptq").lower()
        if fmt not in CHECKPOINT_FORMATS:
            raise ConversionError(f"{where}.checkpoint_format={fmt!r} is not convertible; only {CHECKPOINT_FORMATS} "
                                  "store the plain GPTQ layout (re-save with GPTQModel format='gptq')")
        bits = q.get("bits")
        if bits not in SUPPORTED_BITS:
            raise ConversionError(f"{where}.bits={bits!r} is not convertible; int_group stores {SUPPORTED_BITS} "
                                  "(GPTQModel writes 5/6/7-bit in its planar layout, which has no int_group twin)")
        group_size = q.get("group_size", 128)
        if not isinstance(group_size, int) or isinstance(group_size, bool):
            raise ConversionError(f"{where}.group_size={group_size!r} must be an int")
        pack_dtype = str(q.get("pack_dtype", "int32")).replace("torch.", "")
        if pack_dtype != "int32":
            raise ConversionError(f"{where}.pack_dtype={pack_dtype!r}: only int32 packing words are convertible")
        if q.get("dynamic"):
            raise ConversionError(f"{where}.dynamic={q['dynamic']!r}: per-module overrides (different bits or group "
                                  "sizes per layer) are not convertible into one int_group spec")
        meta = q.get("meta") or {}
        quantizer = meta.get("quantizer") if isinstance(meta, dict) else None
        quantizer = tuple(quantizer) if isinstance(quantizer, (list, tuple)) else ((quantizer,) if quantizer else ())
        return cls(bits=bits, group_size=group_size, sym=bool(q.get("sym", True)),
                   desc_act=bool(q.get("desc_act", False)), checkpoint_format=fmt, quantizer=quantizer)

    def to_dict(self) -> dict:
        return {"format": SOURCE_FORMAT, "checkpoint_format": self.checkpoint_format, "bits": self.bits,
                "group_size": self.group_size, "sym": self.sym, "desc_act": self.desc_act,
                "quantizer": list(self.quantizer)}


@dataclass
class IntGroupLayer:
    """One converted layer, unpacked: codes ``[N, K]``, scale ``[N, G]`` (fp16), zero ``[N, G]``,
    g_idx ``[K]`` (int32; ``None`` when it is the natural grouping), bias or ``None``."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor | None
    bias: torch.Tensor | None

    def is_symmetric(self, bits: int) -> bool:
        return bool((self.zero == (1 << (bits - 1))).all())

    def packed(self, spec: IntGroupSpec) -> dict[str, torch.Tensor]:
        """The stored int_group tensors of this layer under ``spec`` (which must fit it)."""
        g = self.g_idx if self.g_idx is not None else natural_g_idx(spec.group_size, self.codes.shape[1])
        return pack(self.codes, self.scale, self.zero, g, spec)


def natural_g_idx(group_size: int, in_features: int) -> torch.Tensor:
    size = in_features if group_size == -1 else group_size
    return (torch.arange(in_features, dtype=torch.int32) // size).to(torch.int32)


def _unpack_stream(packed: torch.Tensor, bits: int, length: int, where: str) -> torch.Tensor:
    """Codes ``[..., length]`` from int32 words ``[..., W]`` holding a little-endian bit stream."""
    words = packed.shape[-1]
    if words * 32 < length * bits:
        raise ConversionError(f"{where} holds {words} int32 words per row, fewer than the {length} {bits}-bit "
                              f"codes the layer needs ({math.ceil(length * bits / 32)} words)")
    need = math.ceil(words / bits) * bits  # unpack_codes reads whole runs of 32 codes
    if need != words:
        packed = torch.cat([packed, packed.new_zeros(*packed.shape[:-1], need - words)], dim=-1)
    return unpack_codes(packed, bits, length)


def convert_layer(tensors: dict[str, torch.Tensor], source: GPTQSource, in_features: int, out_features: int,
                  where: str) -> IntGroupLayer:
    """One GPTQ layer (``qweight``, ``qzeros``, ``scales``, optional ``g_idx``/``bias``) -> int_group values."""
    bits, k, n = source.bits, in_features, out_features
    for name in ("qweight", "qzeros", "scales"):
        if tensors.get(name) is None:
            raise ConversionError(f"{where}.{name} is missing from the checkpoint")
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    for name in ("qweight", "qzeros"):
        if tensors[name].dtype != torch.int32:
            raise ConversionError(f"{where}.{name} has dtype {tensors[name].dtype}; GPTQ packs into int32 words")
    groups = 1 if source.group_size == -1 else math.ceil(k / source.group_size)
    if tuple(scales.shape) != (groups, n):
        raise ConversionError(f"{where}.scales has shape {tuple(scales.shape)}, expected {(groups, n)} "
                              f"(group_size={source.group_size}, in_features={k}, out_features={n})")
    if qweight.dim() != 2 or qweight.shape[1] != n:
        raise ConversionError(f"{where}.qweight has shape {tuple(qweight.shape)}, expected [K*bits/32, {n}]")
    if qzeros.dim() != 2 or qzeros.shape[0] != groups:
        raise ConversionError(f"{where}.qzeros has shape {tuple(qzeros.shape)}, expected [{groups}, N*bits/32]")

    codes = _unpack_stream(qweight.t().contiguous(), bits, k, f"{where}.qweight")  # [N, K]
    words = qzeros.to(torch.int64) & 0xFFFFFFFF
    if source.checkpoint_format == "gptq" and bits != 3:
        words = (words + _V1_WORD_OFFSET[bits]) & 0xFFFFFFFF
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    zero = _unpack_stream(words, bits, n, f"{where}.qzeros")  # [G, N]
    if source.checkpoint_format == "gptq" and bits == 3:
        zero = ((zero.to(torch.int16) + 1) & 0b111).to(torch.uint8)

    scale = scales.t().contiguous()
    if scale.dtype != torch.float16:
        as_fp16 = scale.to(torch.float16)
        if not scale.is_floating_point() or not torch.equal(as_fp16.to(scale.dtype), scale):
            raise ConversionError(f"{where}.scales in {scales.dtype} do not all fit float16 exactly (int_group stores "
                                  "fp16 scales); this checkpoint cannot be converted without rounding")
        scale = as_fp16
    if not torch.isfinite(scale).all():
        raise ConversionError(f"{where}.scales contains non-finite values")

    g_idx = tensors.get("g_idx")
    if g_idx is not None:
        if tuple(g_idx.shape) != (k,) or g_idx.is_floating_point():
            raise ConversionError(f"{where}.g_idx has shape {tuple(g_idx.shape)} and dtype {g_idx.dtype}, expected "
                                  f"an integer tensor of shape ({k},)")
        lo, hi = int(g_idx.min()), int(g_idx.max())
        if lo < 0 or hi >= groups:
            raise ConversionError(f"{where}.g_idx has values in [{lo}, {hi}], expected [0, {groups})")
        g_idx = g_idx.to(torch.int32)
        if torch.equal(g_idx, natural_g_idx(source.group_size, k)):
            g_idx = None
    return IntGroupLayer(codes=codes, scale=scale, zero=zero.t().contiguous(), g_idx=g_idx, bias=tensors.get("bias"))


def choose_spec(layers: dict[str, IntGroupLayer], source: GPTQSource) -> IntGroupSpec:
    """The one int_group spec every converted layer fits exactly: symmetric only when every zero
    point is the midpoint, act-order only when some layer's g_idx is not the natural grouping."""
    sym = bool(layers) and all(layer.is_symmetric(source.bits) for layer in layers.values())
    act_order = any(layer.g_idx is not None for layer in layers.values())
    try:
        return IntGroupSpec(bits=source.bits, group_size=source.group_size, sym=sym, act_order=act_order)
    except ValueError as e:
        raise ConversionError(f"quantization_config.group_size={source.group_size}: {e}") from None


class GPTQLinear(nn.Module):
    """Holds one layer's GPTQ tensors while a checkpoint loads (shapes and dtypes from the
    safetensors headers); replaced by a QuantLinear right after loading."""

    def __init__(self, in_features: int, out_features: int, entries: dict[str, tuple[tuple, torch.dtype]]):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        for name in TENSORS:
            if name in entries:
                shape, dtype = entries[name]
                self.register_buffer(name, torch.empty(shape, dtype=dtype, device="meta"))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: b for name, b in self._buffers.items() if b is not None}

    def forward(self, x):  # pragma: no cover - never called: replaced before the model is returned
        raise RuntimeError("GPTQLinear is a loading placeholder; the GPTQ import did not finish")
