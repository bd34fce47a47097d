"""Integer group format ("int_group"), format_version 1.

A linear layer ``y = x W^T + b`` with ``W`` of shape ``[N, K]`` (out_features, in_features)
is stored as unsigned integer codes ``q[n, k]`` of ``bits`` bits and per-group float scales
(and, when asymmetric, integer zero points). Input channel ``k`` belongs to group
``g_idx[k]``; without act-order ``g_idx[k] = k // group_size`` (the last group is ragged
when ``K`` is not a multiple of ``group_size``); ``group_size = -1`` means one group per
output channel. The weight the layer computes with is exactly::

    W[n, k] = (q[n, k] - z[n, g_idx[k]]) * s[n, g_idx[k]]        (in fp32, then cast)

with ``z = 2**(bits-1)`` (constant) when symmetric.

On-disk tensors of a module ``<prefix>`` (safetensors, row = output channel):

======================  =======  ===========================================  ============
name                    dtype    shape                                        when
======================  =======  ===========================================  ============
``<prefix>.weight``     int32    ``[N, ceil(K / 32) * bits]``                  always
``<prefix>.weight_scale``  fp16  ``[N, G]``                                    always
``<prefix>.weight_zero``   int32 ``[G, ceil(N / 32) * bits]``                  asymmetric
``<prefix>.weight_g_idx``  int32 ``[K]``, values in ``[0, G)``                 act_order
``<prefix>.bias``       float    ``[N]``                                       if bias
======================  =======  ===========================================  ============

``G = ceil(K / group_size)`` (``1`` for per-channel). Codes are packed as a little-endian
bit stream along the last axis: every run of 32 codes becomes ``bits`` int32 words, code
``j`` of the run occupying bits ``[j*bits, (j+1)*bits)`` of the run; for 2/4/8 bits this is
the usual "32/bits codes per word, lowest code in the lowest bits". The axis is padded with
zero codes to a multiple of 32. Zero points are packed the same way along out_features
(``weight_zero[g]`` holds the zeros of group ``g`` for every output channel), so few groups
cost no padding. The packed tensor is called ``weight`` on purpose: a
process that never imported hfcompress sees an int32 tensor whose shape cannot fit the float
``nn.Linear.weight`` and transformers refuses to load it, instead of silently loading
garbage.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

FORMAT_NAME = "int_group"
FORMAT_VERSION = 1
SUPPORTED_BITS = (2, 3, 4, 8)
SCALE_DTYPE = torch.float16


class FormatError(ValueError):
    """A format spec or a stored tensor that does not follow the int_group contract."""


@dataclass(frozen=True)
class IntGroupSpec:
    """What is stored: bits per code, group size along in_features, symmetry, act-order."""

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    act_order: bool = False

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise FormatError(f"bits={self.bits!r} is not supported; choose one of {SUPPORTED_BITS}")
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool):
            raise FormatError(f"group_size must be an int, got {type(self.group_size).__name__}")
        if self.group_size != -1 and (self.group_size < 8 or self.group_size % 8):
            raise FormatError(
                f"group_size={self.group_size} is not supported; use -1 (per output channel) or a "
                "multiple of 8 that is at least 8 (32, 64, 128 are usual)"
            )

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def n_groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else math.ceil(in_features / self.group_size)

    def effective_group_size(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def check_layer(self, in_features: int, where: str | None = None) -> None:
        """Raise if this spec cannot tile a layer with ``in_features`` inputs."""
        if self.group_size != -1 and self.group_size > in_features:
            raise FormatError(
                f"{where + ': ' if where else ''}group_size={self.group_size} is larger than in_features={in_features}; "
                "use group_size=-1 for one group per output channel, or a smaller group"
            )

    def tensor_shapes(self, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Names (relative to the module), shapes and dtypes of every stored tensor but bias."""
        g = self.n_groups(in_features)
        shapes = {
            "weight": ((out_features, packed_len(in_features, self.bits)), torch.int32),
            "weight_scale": ((out_features, g), SCALE_DTYPE),
        }
        if not self.sym:
            shapes["weight_zero"] = ((g, packed_len(out_features, self.bits)), torch.int32)
        if self.act_order:
            shapes["weight_g_idx"] = ((in_features,), torch.int32)
        return shapes

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        """Stored bits per weight including scales, zeros and g_idx (padding included)."""
        total = 0
        for shape, dtype in self.tensor_shapes(out_features, in_features).values():
            total += math.prod(shape) * torch.finfo(dtype).bits if dtype.is_floating_point else math.prod(shape) * 32
        return total / (out_features * in_features)

    def to_dict(self) -> dict:
        return asdict(self)


def packed_len(n_codes: int, bits: int) -> int:
    return math.ceil(n_codes / 32) * bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes ``[..., L]`` (values < 2**bits) into int32 ``[..., ceil(L/32)*bits]``."""
    if bits not in SUPPORTED_BITS:
        raise FormatError(f"bits={bits} is not supported; choose one of {SUPPORTED_BITS}")
    *lead, length = codes.shape
    runs = math.ceil(length / 32)
    c = torch.zeros(*lead, runs * 32, dtype=torch.int64, device=codes.device)
    c[..., :length] = codes.to(torch.int64)
    c = c.view(*lead, runs, 32)
    # bit position of each code inside its 32*bits-bit run, then scatter into int64 words
    shifts = torch.arange(32, device=codes.device, dtype=torch.int64) * bits
    word, offset = shifts // 32, shifts % 32
    out = torch.zeros(*lead, runs, bits, dtype=torch.int64, device=codes.device)
    low = (c << offset) & 0xFFFFFFFF
    out.index_add_(-1, word, low)
    spill = offset + bits > 32  # codes straddling two words (3-bit only)
    if spill.any():
        high = c[..., spill] >> (32 - offset[spill])
        out.index_add_(-1, word[spill] + 1, high)
    out = torch.where(out >= 2**31, out - 2**32, out)
    return out.view(*lead, runs * bits).to(torch.int32)


def unpack_codes(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 ``[..., ceil(L/32)*bits]`` -> uint8 ``[..., L]``."""
    *lead, n_words = packed.shape
    runs = n_words // bits
    w = packed.to(torch.int64) & 0xFFFFFFFF
    w = w.view(*lead, runs, bits)
    shifts = torch.arange(32, device=packed.device, dtype=torch.int64) * bits
    word, offset = shifts // 32, shifts % 32
    val = w[..., word] >> offset
    spill = offset + bits > 32
    if 32 % bits:  # only widths that do not divide 32 straddle (a Python test: traceable, no guard)
        nxt = torch.clamp(word + 1, max=bits - 1)
        val = torch.where(spill, val | (w[..., nxt] << (32 - offset)), val)
    val = val & ((1 << bits) - 1)
    return val.reshape(*lead, runs * 32)[..., :length].to(torch.uint8)


def default_g_idx(spec: IntGroupSpec, in_features: int, device=None) -> torch.Tensor:
    g = spec.effective_group_size(in_features)
    return (torch.arange(in_features, device=device, dtype=torch.int32) // g).to(torch.int32)


def dequantize(
    qweight: torch.Tensor,
    scale: torch.Tensor,
    qzero: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    spec: IntGroupSpec,
    in_features: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The reference: the float weight ``[N, K]`` this format stores (the spec above)."""
    n_out = scale.shape[0]
    codes = unpack_codes(qweight, spec.bits, in_features).to(torch.float32)
    if g_idx is None:
        g_idx = default_g_idx(spec, in_features, qweight.device)
    g_idx = g_idx.long()
    s = scale.to(torch.float32)[:, g_idx]
    if spec.sym:
        z = float(1 << (spec.bits - 1))
    else:
        z = unpack_codes(qzero, spec.bits, n_out).to(torch.float32).t()[:, g_idx]
    return ((codes - z) * s).to(dtype)


def validate_tensors(tensors: dict[str, torch.Tensor | None], spec: IntGroupSpec, out_features: int,
                     in_features: int, where: str) -> None:
    """Check stored tensors against the contract; the error names the tensor and what is wrong."""
    for name, (shape, dtype) in spec.tensor_shapes(out_features, in_features).items():
        t = tensors.get(name)
        full = f"{where}.{name}"
        if t is None:
            raise FormatError(f"{full} is missing; the {FORMAT_NAME} spec {spec} requires it")
        if tuple(t.shape) != shape:
            raise FormatError(f"{full} has shape {tuple(t.shape)}, expected {shape} for {spec} "
                              f"with out_features={out_features}, in_features={in_features}")
        if t.dtype != dtype:
            raise FormatError(f"{full} has dtype {t.dtype}, expected {dtype}")
        if t.is_meta:
            continue
        if name == "weight_g_idx":
            g = spec.n_groups(in_features)
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= g:
                raise FormatError(f"{full} has values in [{lo}, {hi}], expected values in [0, {g}) "
                                  f"(the layer has {g} groups)")
        if name == "weight_scale" and not torch.isfinite(t).all():
            raise FormatError(f"{full} contains non-finite scales")
